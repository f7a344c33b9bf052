"""Task files: one evaluation example a JSON line, e.g. a LongBench or RULER QA set exported with its prompts.

    {"task": "narrativeqa", "prompt": "...", "answers": ["..."], "max_new_tokens": 128, "metric": "qa_f1"}

`task` may be spelled `dataset` (LongBench's field); `answers` may be `answer`, a string or a list of them;
`metric` and `max_new_tokens` default from `metrics.TASKS` by task name; `all_classes` (LongBench's label set)
is required by the classification metric. Fields the reader does not use are kept in the example's meta.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from megatron_refine.data.jsonl import jsonl_rows
from megatron_refine.data.shards import DataError
from megatron_refine.data.tokenizers import Tokenizer
from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.metrics import METRICS, TASKS

TRUNCATIONS = ("middle", "left")
_USED = {"task", "dataset", "prompt", "answers", "answer", "metric", "max_new_tokens"}


def truncate_tokens(ids: list[int], max_tokens: int, how: str = "middle") -> list[list[int]]:
    """The pieces of `ids` kept under a budget of `max_tokens`, in order.

    "middle" is LongBench's pred.py: the first and the last max_tokens // 2 tokens (an odd budget keeps one
    token fewer, as LongBench does), where the instructions and the question sit. "left" keeps the last tokens.
    """
    if how not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {how!r}: use one of {', '.join(TRUNCATIONS)}")
    if len(ids) <= max_tokens:
        return [ids]
    if how == "left":
        return [ids[len(ids) - max_tokens:]]
    half = max_tokens // 2
    return [ids[:half], ids[-half:]]


def read_task_file(
    path: str | Path, tokenizer: Tokenizer, max_prompt_tokens: int, truncate: str = "middle"
) -> tuple[list[EvalExample], dict]:
    """Read a task file; prompts over `max_prompt_tokens` are cut (see `truncate_tokens`) and decoded back.

    Returns the examples and a report: {"examples": {task: count}, "truncated": {task: count}}.
    """
    if truncate not in TRUNCATIONS:
        raise ValueError(f"unknown truncation {truncate!r}: use one of {', '.join(TRUNCATIONS)}")
    if max_prompt_tokens < (2 if truncate == "middle" else 1):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} leaves no prompt: give a positive budget "
                         "(at least 2 for middle truncation, which keeps a head and a tail)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found: pass the path of a .jsonl task file")

    examples, counts, truncated = [], Counter(), Counter()
    for row, where in jsonl_rows(path):
        ex = _example(row, where)
        ids = tokenizer.encode(ex.prompt)
        pieces = truncate_tokens(ids, max_prompt_tokens, truncate)
        cut = len(pieces) > 1 or len(pieces[0]) < len(ids)
        if cut:
            ex.prompt = "".join(tokenizer.decode(p) for p in pieces)  # piece by piece, as LongBench
            truncated[ex.task] += 1
        ex.meta.update(source=where, prompt_tokens=len(ids), truncated=cut)
        counts[ex.task] += 1
        examples.append(ex)
    if not examples:
        raise DataError(f"{path} holds no examples: write one JSON object a line")
    return examples, {"examples": dict(counts), "truncated": dict(truncated)}


def _example(row, where: str) -> EvalExample:
    """One line's fields checked and defaulted; every message names the line and the fix."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    task = row.get("task", row.get("dataset"))
    if not isinstance(task, str) or not task:
        raise DataError(f"{where}: missing field 'task': name the task (e.g. narrativeqa), or 'dataset' as "
                        "LongBench writes it")
    prompt = row.get("prompt")
    if prompt is None and ("context" in row or "input" in row):
        raise DataError(f"{where}: missing field 'prompt': this looks like LongBench's raw data ('context', "
                        "'input'); fill the task's template from LongBench's dataset2prompt.json into 'prompt'")
    if not isinstance(prompt, str):
        raise DataError(f"{where}: missing field 'prompt' (a string, the whole model input)")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: missing field 'answers': give 'answers' (a non-empty list of strings) or "
                        "'answer' (a string or such a list)")
    if not all(a.strip() for a in answers):  # "" is a substring of every prediction: it would score 100%
        raise DataError(f"{where}: an empty answer in {answers!r:.80}: every prediction contains it; remove it (or the "
                        "line, when it has no other answer)")

    metric, max_new_tokens = TASKS.get(task, (None, None))
    metric = row.get("metric", metric)
    if metric is None:
        raise DataError(f"{where}: unknown task {task!r} and no 'metric' field: add a 'metric' field "
                        f"({', '.join(sorted(METRICS))}) or use a known task name ({', '.join(TASKS)})")
    if metric not in METRICS:
        raise DataError(f"{where}: unknown metric {metric!r}: use one of {', '.join(sorted(METRICS))}")
    max_new_tokens = row.get("max_new_tokens", max_new_tokens)
    if max_new_tokens is None:
        raise DataError(f"{where}: unknown task {task!r} and no 'max_new_tokens' field: add 'max_new_tokens'")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise DataError(f"{where}: 'max_new_tokens' is {max_new_tokens!r}: give a positive integer")
    if metric == "classification" and not (
        isinstance(row.get("all_classes"), list) and row["all_classes"]
        and all(isinstance(c, str) for c in row["all_classes"])
    ):
        raise DataError(f"{where}: missing field 'all_classes': the classification metric needs the task's "
                        "label names as a list of strings (LongBench's TREC export has it)")
    meta = {k: v for k, v in row.items() if k not in _USED}
    return EvalExample(task=task, prompt=prompt, answers=answers, max_new_tokens=max_new_tokens, metric=metric,
                       meta=meta)
