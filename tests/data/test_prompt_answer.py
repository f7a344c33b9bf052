"""data.layout=prompt_answer: rows of [prompt][answer EOS][padding] with prompt and answer label masks, cut to fit
and counted, sharded over DP ranks as Megatron's sampler does, resumable; and the RULER parquet converter."""

import json

import pytest
import torch

from megatron_refine.data import ByteTokenizer, DataError
from megatron_refine.data.prompt_answer import PromptAnswerDataset, PromptAnswerLoader, parquet_to_jsonl

EOS = ByteTokenizer.eos_id


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_mark_prompt_and_answer_labels(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"prompt": "abcdef", "answer": "XY", "task": "t"},
                                          {"prompt": "0123456789", "answers": ["Z", "W"]}])
    data = PromptAnswerDataset.open(path, ByteTokenizer(), seq_length=16, max_answer_tokens=4)
    batch = PromptAnswerLoader(data, 16, 2, shuffle=False).next_batch()
    row = torch.cat([batch.tokens, batch.labels[:, -1:]], 1)
    assert row[0, :9].tolist() == list(b"abcdef") + list(b"XY") + [EOS]  # the answer ends with EOS
    assert row[1, :12].tolist() == list(b"0123456789") + list(b"Z") + [EOS]  # the first answer is the target
    assert (row[0, 9:] == EOS).all()
    assert batch.branch_lengths.tolist() == [5, 9]  # labels inside the prompt
    for b, (prompt, answer) in enumerate([("abcdef", "XY"), ("0123456789", "Z")]):
        labels = batch.labels[b]
        assert labels[batch.update_mask[b].bool()].tolist() == list(prompt.encode())[1:]
        assert labels[batch.loss_mask[b].bool()].tolist() == list(answer.encode()) + [EOS]
    assert not (batch.update_mask.bool() & batch.loss_mask.bool()).any()


def test_prompts_and_answers_are_cut_to_fit_and_counted():
    long = "".join(chr(97 + i % 26) for i in range(40))
    for how, kept in (("left", long[-12:]), ("right", long[:12])):
        data = PromptAnswerDataset.from_texts([long, "short"], ["a" * 10, "b"], ByteTokenizer(), seq_length=16,
                                              max_answer_tokens=4, truncation=how)
        assert data.examples[0][0] == list(kept.encode())  # seq_length - max_answer_tokens prompt tokens
        assert data.examples[0][1] == list(b"aaaa")  # the answer and its EOS cut to 4: it goes on past the cut
        assert (data.truncated_prompts, data.truncated_answers) == (1, 1)
    with pytest.raises(ValueError, match="data.prompt_truncation must be one of"):
        PromptAnswerDataset.from_texts(["ab"], ["c"], ByteTokenizer(), 16, truncation="middle")


def test_bad_lines_name_the_line_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"qa.jsonl:2: missing field 'answer'"):
        PromptAnswerDataset.open(_write(tmp_path / "qa.jsonl", [{"prompt": "ab", "answer": "c"}, {"prompt": "cd"}]),
                                 ByteTokenizer(), 64)
    # test-time training reads prompts alone
    data = PromptAnswerDataset.open(tmp_path / "qa.jsonl", ByteTokenizer(), 64, require_answers=False)
    assert data.examples[1] == (list(b"cd"), [])
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'prompt'"):
        PromptAnswerDataset.open(_write(tmp_path / "bad.jsonl", [{"question": "ab"}]), ByteTokenizer(), 64)
    with pytest.raises(FileNotFoundError, match="parquet_to_jsonl"):
        PromptAnswerDataset.open(tmp_path / "missing.jsonl", ByteTokenizer(), 64)


def test_empty_answers_are_counted_and_a_file_of_only_empty_answers_is_refused(tmp_path):
    """An empty answer's SFT target is EOS alone: counted in the summary; all of them is refused (refine-post)."""
    rows = [{"prompt": "abcdef", "answer": ""}, {"prompt": "ghijkl", "answers": ["  "]}]
    with pytest.raises(DataError, match=r"qa.jsonl: every answer is empty.*fill in the 'answer' fields"):
        PromptAnswerDataset.open(_write(tmp_path / "qa.jsonl", rows), ByteTokenizer(), 64)
    data = PromptAnswerDataset.open(tmp_path / "qa.jsonl", ByteTokenizer(), 64, require_answers=False)  # stage ttt
    assert data.empty_answers == 2
    data = PromptAnswerDataset.open(_write(tmp_path / "qa.jsonl", [*rows, {"prompt": "mnopqr", "answer": "s"}]),
                                    ByteTokenizer(), 64)
    assert data.empty_answers == 2 and "; 2 empty answers (EOS only)" in data.summary()


def test_prompts_too_short_for_refine_are_counted():
    """A prompt of <= 2 x margin + 1 tokens leaves no REFINE position between the margins: its update is NTP alone."""
    data = PromptAnswerDataset.from_texts(["a" * 11, "b" * 12, "c" * 30], [None] * 3, ByteTokenizer(), 64)
    assert [data.without_refine_positions(m) for m in (5, 6, 20)] == [1, 2, 3]
    assert "2 prompts of <= 13 tokens, too short for REFINE (refine.margin 6 at both ends)" in data.summary(6)
    assert "REFINE" not in data.summary()


def test_data_parallel_ranks_take_their_micro_batch_of_one_global_order_and_resume():
    prompts = [f"prompt {i:02d}" for i in range(10)]
    data = PromptAnswerDataset.from_texts(prompts, ["a"] * 10, ByteTokenizer(), 32, 4)
    first = lambda batch: [bytes(r[:9].tolist()).decode() for r in batch.tokens]  # noqa: E731
    one = PromptAnswerLoader(data, 32, 4, seed=3)
    ranks = [PromptAnswerLoader(data, 32, 2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(4):  # past the end of an epoch: the next epoch's order follows
        global_batch = first(one.next_batch())
        assert first(ranks[0].next_batch()) + first(ranks[1].next_batch()) == global_batch
    assert sorted(first(PromptAnswerLoader(data, 32, 10, seed=3).next_batch())) == prompts  # an epoch holds each once
    in_order = PromptAnswerLoader(data, 32, 4, shuffle=False)
    assert first(in_order.next_batch()) == prompts[:4]
    resumed = PromptAnswerLoader(data, 32, 4, shuffle=False)
    resumed.load_state_dict(in_order.state_dict())
    assert first(resumed.next_batch()) == first(in_order.next_batch()) == prompts[4:8]
    assert first(in_order.next_batch()) == prompts[8:] + prompts[:2]  # wraps around
    with pytest.raises(ValueError, match="data.layout=prompt_answer"):
        resumed.load_state_dict({"epoch": 0, "shard": 0, "document": 0, "skipped": 0})


def test_ruler_parquet_converts_to_prompt_answer_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Context. Question?", "Other?"], "answer": [["yes", "Yes"], ["no"]],
                             "data_source": ["squad", "squad"]}), tmp_path / "qa.parquet")
    assert parquet_to_jsonl(tmp_path / "qa.parquet", tmp_path / "qa.jsonl", task="ruler_squad") == 2
    lines = [json.loads(line) for line in (tmp_path / "qa.jsonl").read_text().splitlines()]
    assert lines[0] == {"prompt": "Context. Question?", "answers": ["yes", "Yes"], "task": "ruler_squad"}
    data = PromptAnswerDataset.open(tmp_path / "qa.jsonl", ByteTokenizer(), 64)
    assert data.examples[1] == (list(b"Other?"), list(b"no") + [EOS])
    # integer answers (a count, a year) are written as text, not refused with a TypeError
    pq.write_table(pa.table({"prompt": ["How many?", "Year?"], "answer": [3, 1999]}), tmp_path / "int.parquet")
    assert parquet_to_jsonl(tmp_path / "int.parquet", tmp_path / "int.jsonl") == 2
    assert [json.loads(line)["answers"] for line in (tmp_path / "int.jsonl").open()] == [["3"], ["1999"]]
    pq.write_table(pa.table({"prompt": ["Q?"], "answer": [[1, 2]]}), tmp_path / "ints.parquet")
    parquet_to_jsonl(tmp_path / "ints.parquet", tmp_path / "ints.jsonl")
    assert json.loads((tmp_path / "ints.jsonl").read_text())["answers"] == ["1", "2"]
    for answer in ([[""]], [2.5]):  # an empty answer matches every prediction; a float has no one spelling
        pq.write_table(pa.table({"prompt": ["Q?"], "answer": answer}), tmp_path / "bad.parquet")
        with pytest.raises(DataError, match=r"bad.parquet row 0: column 'answer' holds .*non-empty strings"):
            parquet_to_jsonl(tmp_path / "bad.parquet", tmp_path / "bad.jsonl")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"no column\(s\) \['prompt', 'answer'\]"):
        parquet_to_jsonl(tmp_path / "bad.parquet", tmp_path / "bad.jsonl")
