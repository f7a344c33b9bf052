"""Task files: formats, defaults from the task tables, LongBench's middle truncation, counts, and errors.

ByteTokenizer makes every ASCII character one token, so truncation is checked by eye.
"""

import json

import pytest

from megatron_refine.data import ByteTokenizer, DataError
from megatron_refine.evaluation.jsonl import read_task_file, truncate_tokens

TOK = ByteTokenizer()


def write(tmp_path, rows, name="tasks.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_truncate_tokens():
    ids = list(range(10))
    assert truncate_tokens(ids, 6) == [[0, 1, 2], [7, 8, 9]]  # half = 3 from each end
    assert truncate_tokens(ids, 7) == [[0, 1, 2], [7, 8, 9]]  # odd budget: half = 3, one token fewer (LongBench)
    assert truncate_tokens(ids, 4, "left") == [[6, 7, 8, 9]]  # the last 4
    assert truncate_tokens(ids, 10) == [ids] and truncate_tokens(ids, 10, "left") == [ids]
    with pytest.raises(ValueError, match="middle, left"):
        truncate_tokens(ids, 4, "right")


def test_formats_and_defaults(tmp_path):
    path = write(tmp_path, [
        {"task": "narrativeqa", "prompt": "p1", "answers": ["a", "b"], "_id": "x1"},
        "",  # blank lines are skipped
        {"dataset": "triviaqa", "prompt": "p2", "answer": "c", "max_new_tokens": 8},
        {"task": "ruler_squad", "prompt": "p3", "answer": ["d", "e"]},
        {"task": "my_task", "prompt": "p4", "answer": "f", "metric": "exact_match", "max_new_tokens": 5},
        {"task": "trec", "prompt": "p5", "answers": ["City"], "all_classes": ["City", "Country"]},
    ])
    examples, report = read_task_file(path, TOK, max_prompt_tokens=100)
    got = [(e.task, e.prompt, e.answers, e.metric, e.max_new_tokens) for e in examples]
    assert got == [
        ("narrativeqa", "p1", ["a", "b"], "qa_f1", 128),  # metric and budget from LONGBENCH_TASKS
        ("triviaqa", "p2", ["c"], "qa_f1_first_line", 8),  # "dataset" names the task; the line's budget wins
        ("ruler_squad", "p3", ["d", "e"], "ruler_substring", 32),
        ("my_task", "p4", ["f"], "exact_match", 5),  # an unknown task with its own metric and budget
        ("trec", "p5", ["City"], "classification", 64),
    ]
    assert examples[0].length is None
    assert examples[0].meta == {"_id": "x1", "source": f"{path}:1", "prompt_tokens": 2, "truncated": False}
    assert examples[1].meta["source"] == f"{path}:3"  # line numbers count the blank line
    assert examples[4].meta["all_classes"] == ["City", "Country"]
    assert report == {"examples": {"narrativeqa": 1, "triviaqa": 1, "ruler_squad": 1, "my_task": 1, "trec": 1},
                      "truncated": {}}


def test_middle_truncation_keeps_head_and_tail_and_counts_per_task(tmp_path):
    path = write(tmp_path, [
        {"task": "narrativeqa", "prompt": "abcdefghij", "answer": "x"},  # 10 tokens > 6: cut
        {"task": "narrativeqa", "prompt": "abcdef", "answer": "x"},  # exactly 6: kept whole
        {"task": "qasper", "prompt": "0123456789ABC", "answer": "x"},  # 13 tokens > 6: cut
        {"task": "hotpotqa", "prompt": "xyz", "answer": "x"},
    ])
    examples, report = read_task_file(path, TOK, max_prompt_tokens=6)
    # 6 // 2 = 3 tokens from each end.
    assert [e.prompt for e in examples] == ["abchij", "abcdef", "012ABC", "xyz"]
    assert [e.meta["truncated"] for e in examples] == [True, False, True, False]
    assert [e.meta["prompt_tokens"] for e in examples] == [10, 6, 13, 3]  # the lengths before the cut
    assert report == {"examples": {"narrativeqa": 2, "qasper": 1, "hotpotqa": 1},
                      "truncated": {"narrativeqa": 1, "qasper": 1}}


def test_left_truncation_keeps_the_last_tokens(tmp_path):
    path = write(tmp_path, [{"task": "narrativeqa", "prompt": "abcdefghij", "answer": "x"}])
    examples, report = read_task_file(path, TOK, max_prompt_tokens=4, truncate="left")
    assert examples[0].prompt == "ghij"
    assert report["truncated"] == {"narrativeqa": 1}


GOOD = {"task": "narrativeqa", "prompt": "p", "answer": "a"}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "answer": "a"}, r"tasks.jsonl:2: missing field 'task'"),
    ({"task": "narrativeqa", "answer": "a"}, r"tasks.jsonl:2: missing field 'prompt'"),
    ({"task": "narrativeqa", "context": "c", "input": "q", "answers": ["a"]},
     r":2: missing field 'prompt'.*dataset2prompt"),
    ({"task": "narrativeqa", "prompt": "p"}, r"tasks.jsonl:2: missing field 'answers'"),
    ({"task": "narrativeqa", "prompt": "p", "answers": []}, r":2: missing field 'answers'"),
    ({"task": "narrativeqa", "prompt": "p", "answers": [1]}, r":2: missing field 'answers'"),
    # "" is a substring of every prediction: it scored 100%
    ({"task": "narrativeqa", "prompt": "p", "answers": [""]}, r"tasks.jsonl:2: an empty answer in \[''\]"),
    ({"task": "ruler_squad", "prompt": "p", "answers": ["a", " "]}, r":2: an empty answer in \['a', ' '\]"),
    ({"task": "my_task", "prompt": "p", "answer": "a"},
     r":2: unknown task 'my_task' and no 'metric' field: add a 'metric' field .*or use a known task name.*narrativeqa"),
    ({"task": "my_task", "prompt": "p", "answer": "a", "metric": "qa_f1"}, r":2: .*add 'max_new_tokens'"),
    ({"task": "narrativeqa", "prompt": "p", "answer": "a", "metric": "bleu"}, r":2: unknown metric 'bleu'.*qa_f1"),
    ({"task": "narrativeqa", "prompt": "p", "answer": "a", "max_new_tokens": 0}, r":2: 'max_new_tokens' is 0"),
    ({"task": "trec", "prompt": "p", "answer": "City"}, r":2: missing field 'all_classes'"),
    ("[1, 2]", r":2: expected a JSON object"),
    ('{"task": "narrativeqa",', r"tasks.jsonl:2: not valid JSON"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path, [GOOD, row])
    with pytest.raises(DataError, match=message):
        read_task_file(path, TOK, max_prompt_tokens=100)


def test_bad_arguments(tmp_path):
    path = write(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="unknown truncation 'right'"):
        read_task_file(path, TOK, 100, truncate="right")
    with pytest.raises(ValueError, match="at least 2 for middle"):
        read_task_file(path, TOK, 1)
    assert read_task_file(path, TOK, 1, truncate="left")[0][0].prompt == "p"
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        read_task_file(tmp_path / "nope.jsonl", TOK, 100)
    with pytest.raises(DataError, match="holds no examples"):
        read_task_file(write(tmp_path, ["", "  "], name="empty.jsonl"), TOK, 100)
