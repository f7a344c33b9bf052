"""Held-out associative-recall tasks on the built-in corpus's dense key-value tables, in four variants after
RULER's needle tasks: a table of "K=VV" lines, then one ask line ("K?") the model completes greedily.

- recall_single: one key asked from a table of 8;
- recall_multikey: one key asked from a table of 24, more distractors than any training table holds (2 to 16);
- recall_multiquery: three keys asked on one line ("K1,K2,K3?" -> "V1,V2,V3"), each value found earns a third
  (RULER's string_match_all);
- recall_multivalue: one key written twice with two values, both asked ("K?" -> "V1 V2").

Generate them from a seed the training corpus did not use: the tables are then new to the model. The examples
are `EvalExample`s for `evaluation.runner.evaluate`, and `write_task_file` writes them as the jsonl that
`megatron-refine eval --data` reads.

The demo's post-training and test-time training run on question / answer prompts over the corpus's kinds
(`QA_TASKS`): qa_table asks one key of a table of 16 ("K?" -> "VV"), qa_registry one key of a registry ("ask K = "
-> "VVV"), qa_facts where one of three people lives ("where does P live ? " -> "CITY"); written with answers, they
are also `data.layout=prompt_answer` files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_refine.data.corpus import TABLE_KEYS, ask_line, facts_prompt, registry_prompt, table_lines
from megatron_refine.evaluation.examples import EvalExample

RECALL_TASKS = ("recall_single", "recall_multikey", "recall_multiquery", "recall_multivalue")
TABLE_PAIRS = 8  # keys in the table of every task but multikey
MULTIKEY_PAIRS = 24


def recall_example(task: str, rng: random.Random) -> EvalExample:
    """One held-out example of `task` (a name of RECALL_TASKS)."""
    if task not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {task!r}: use one of {', '.join(RECALL_TASKS)}")
    keys = rng.sample(TABLE_KEYS, MULTIKEY_PAIRS if task == "recall_multikey" else TABLE_PAIRS)
    asked = rng.sample(keys, 3 if task == "recall_multiquery" else 1)
    text, values = table_lines(rng, keys, asked if task == "recall_multivalue" else [])
    prompt, answer = ask_line(asked, values)
    if task in ("recall_single", "recall_multikey"):
        answers, metric = [answer], "exact_match"
    else:
        answers, metric = [v for k in asked for v in values[k]], "ruler_match_all"
    return EvalExample(task=task, prompt=text + prompt, answers=answers, max_new_tokens=len(answer.encode()),
                       metric=metric, meta={"keys": len(keys)})


def recall_examples(samples: int, seed: int, tasks: tuple[str, ...] = RECALL_TASKS) -> list[EvalExample]:
    """`samples` examples of each task, deterministic from `seed`."""
    rng = random.Random(seed)
    return [recall_example(task, rng) for task in tasks for _ in range(samples)]


QA_TASKS = ("qa_table", "qa_registry", "qa_facts")
QA_TABLE_PAIRS = 16  # the largest training tables


def qa_example(task: str, rng: random.Random) -> EvalExample:
    """One question / answer example of `task` (a name of QA_TASKS), exact match."""
    if task == "qa_table":
        keys = rng.sample(TABLE_KEYS, QA_TABLE_PAIRS)
        text, values = table_lines(rng, keys)
        question, answer = ask_line([rng.choice(keys)], values)
        prompt = text + question
    elif task == "qa_registry":
        text, values = registry_prompt(rng)
        key = rng.choice(list(values))
        prompt, answer = f"{text}ask {key} = ", values[key]
    elif task == "qa_facts":
        text, homes = facts_prompt(rng)
        person = rng.choice(list(homes))
        prompt, answer = f"{text}where does {person} live ? ", homes[person]
    else:
        raise ValueError(f"unknown QA task {task!r}: use one of {', '.join(QA_TASKS)}")
    return EvalExample(task=task, prompt=prompt, answers=[answer], max_new_tokens=len(answer.encode()),
                       metric="exact_match")


def qa_examples(samples: int, seed: int, tasks: tuple[str, ...] = QA_TASKS) -> list[EvalExample]:
    """`samples` examples of each QA task, deterministic from `seed`, the tasks interleaved (a test stream)."""
    rng = random.Random(seed)
    return [qa_example(task, rng) for _ in range(samples) for task in tasks]


def write_task_file(examples: list[EvalExample], path: str | Path) -> Path:
    """The examples as a `megatron-refine eval --data` task file (evaluation/jsonl.py's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps({"task": ex.task, "prompt": ex.prompt, "answers": ex.answers,
                                "max_new_tokens": ex.max_new_tokens, "metric": ex.metric, **ex.meta}) + "\n")
    return path
