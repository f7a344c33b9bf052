"""The demo's held-out recall tasks: each answer is stated in its table exactly as asked, the task file round-trips
through `megatron-refine eval`'s reader, and the metrics score the planted answer 1 and another value 0."""

import random
import re

import pytest

from megatron_refine.data import ByteTokenizer
from megatron_refine.data.corpus import generate_documents
from megatron_refine.evaluation.jsonl import read_task_file
from megatron_refine.evaluation.metrics import score_example
from megatron_refine.evaluation.recall_tasks import (
    MULTIKEY_PAIRS, RECALL_TASKS, TABLE_PAIRS, recall_example, recall_examples, write_task_file)


def _table(prompt: str) -> list[tuple[str, str]]:
    return re.findall(r"^([A-Z])=(\d\d)$", prompt, flags=re.M)


@pytest.mark.parametrize("task", RECALL_TASKS)
def test_every_answer_is_planted_in_the_table_under_the_asked_key(task):
    for ex in recall_examples(30, seed=7, tasks=(task,)):
        lines, asked = _table(ex.prompt), ex.prompt.rsplit("\n", 1)[1]
        keys = asked.removesuffix("?").split(",")
        assert asked.endswith("?") and ex.task == task
        assert len({k for k, _ in lines}) == (MULTIKEY_PAIRS if task == "recall_multikey" else TABLE_PAIRS)
        assert len(keys) == (3 if task == "recall_multiquery" else 1)
        stated = [v for k in keys for key, v in lines if key == k]
        assert stated == ex.answers  # in table order; a multivalue key twice, with two different-line values
        assert len(stated) == (2 if task == "recall_multivalue" else len(keys))
        answer = ",".join(ex.answers) if task == "recall_multiquery" else " ".join(ex.answers)
        assert ex.max_new_tokens == len(answer)  # one byte token a character: the budget is the answer
        assert score_example(ex, answer) == 1.0
        assert score_example(ex, "x" * len(answer)) == 0.0


def test_tasks_are_deterministic_and_held_out_from_the_corpus():
    assert recall_examples(5, seed=3) == recall_examples(5, seed=3)
    assert recall_examples(5, seed=3) != recall_examples(5, seed=4)
    corpus = set(generate_documents(2000, seed=0))
    assert not any(ex.prompt in doc for ex in recall_examples(20, seed=10_000) for doc in corpus)
    with pytest.raises(ValueError, match="unknown recall task 'recall_x': use one of recall_single"):
        recall_example("recall_x", random.Random(0))


def test_the_task_file_reads_back_as_the_same_examples(tmp_path):
    examples = recall_examples(3, seed=1)
    read, report = read_task_file(write_task_file(examples, tmp_path / "recall.jsonl"), ByteTokenizer(), 256)
    assert report["examples"] == {task: 3 for task in RECALL_TASKS} and not report["truncated"]
    assert [(e.task, e.prompt, e.answers, e.max_new_tokens, e.metric) for e in read] == \
        [(e.task, e.prompt, e.answers, e.max_new_tokens, e.metric) for e in examples]


def test_every_question_is_answered_by_its_prompt_and_trains_as_prompt_answer_data(tmp_path):
    from megatron_refine.data.prompt_answer import PromptAnswerDataset
    from megatron_refine.evaluation.recall_tasks import QA_TABLE_PAIRS, QA_TASKS, qa_examples

    examples = qa_examples(20, seed=3)
    assert [ex.task for ex in examples[:3]] == list(QA_TASKS)  # interleaved: a test stream of every kind
    for ex in examples:
        (answer,) = ex.answers
        *body, question = ex.prompt.rsplit("\n", 1)
        if ex.task == "qa_table":
            assert len(_table(ex.prompt)) == QA_TABLE_PAIRS and (question.removesuffix("?"), answer) in _table(ex.prompt)
        elif ex.task == "qa_registry":
            key = re.fullmatch(r"ask (\w+) = ", question).group(1)
            assert f"key {key} = {answer}\n" in ex.prompt
        else:
            person = re.fullmatch(r"where does (\w+) live \? ", question).group(1)
            assert f"{person} lives in {answer} ." in ex.prompt
        assert score_example(ex, answer) == 1.0 and ex.max_new_tokens == len(answer)
    data = PromptAnswerDataset.open(write_task_file(examples, tmp_path / "qa.jsonl"), ByteTokenizer(), 256, 8)
    assert data.truncated_prompts == 0 and [len(a) for _, a in data.examples] == [len(e.answers[0]) + 1 for e in examples]
