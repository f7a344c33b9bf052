"""Greedy answers to evaluation prompts with the cached decoder, scored and tabulated.

Prompts of any lengths run together: a batch is packed into one row whose documents restart the fast-weight
state (models/packing.py), one forward keeps each prompt's decoding state after its last token (`prefill`: the
kernels' final states), and the cached decoder then steps all of them at once, each stopping at EOS or its
task's token budget. Packing leaves every
prompt's result what it would be alone. Examples are split over data-parallel ranks; the scores are gathered,
grouped by (task, length), and written as a console table, results.json and results.csv.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.models import FastWeightGPTModel, packed_seq_params
from megatron_refine.models.generation import same_on_tp_ranks, sampling_logits


@torch.no_grad()
def generate_packed(model: FastWeightGPTModel, prompts: list[list[int]], max_new_tokens: list[int],
                    eos_id: int | None) -> list[list[int]]:
    """Greedy continuations of prompts of any lengths, packed in one row: each prompt's tokens up to its
    `max_new_tokens` or its first EOS (included)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sp = model.config.sequence_parallel
    rows = list(prompts) + [prompts[-1]] * ((-len(prompts)) % tp if sp else 0)  # decoding rows split over TP
    device = next(model.parameters()).device
    ends = torch.cumsum(torch.tensor([len(p) for p in rows], device=device), 0)
    flat = [t for p in rows for t in p]
    pad = (-len(flat)) % tp if sp else 0  # the sequence split over TP: padding as a document of its own
    tokens = torch.tensor([flat + [0] * pad], device=device)
    cu_seqlens = torch.cat([ends.new_zeros(1), ends] + ([ends[-1:] + pad] if pad else []))
    logits, cache = model.prefill(tokens, packed_seq_params(cu_seqlens))  # [N, V/t], N rows (+ the padding's)
    if pad:
        logits, cache = logits[:-1], cache.select(torch.arange(len(rows), device=device))
    budgets = torch.tensor(max_new_tokens + [1] * (len(rows) - len(prompts)))
    outputs, done = [[] for _ in rows], torch.zeros(len(rows), dtype=torch.bool)
    for i in range(int(budgets.max())):
        next_tokens = same_on_tp_ranks(sampling_logits(logits, model.tokenizer_vocab_size).argmax(-1))
        for r, t in enumerate(next_tokens.tolist()):
            if not done[r]:
                outputs[r].append(t)
                done[r] = len(outputs[r]) >= budgets[r] or t == eos_id
        if bool(done.all()):
            break
        logits, _ = model.step(next_tokens, cache)
    return outputs[: len(prompts)]


def _batches(examples: list[tuple[int, list[int], EvalExample]], batch_size: int, max_batch_tokens: int):
    batch, tokens = [], 0
    for item in examples:
        if batch and (len(batch) == batch_size or tokens + len(item[1]) > max_batch_tokens):
            yield batch
            batch, tokens = [], 0
        batch.append(item)
        tokens += len(item[1])
    if batch:
        yield batch


@torch.no_grad()
def evaluate(model: FastWeightGPTModel, tokenizer, examples: list[EvalExample], *, batch_size: int = 8,
             max_batch_tokens: int = 65536, progress: bool = True) -> list[dict]:
    """Every example's prediction and score ({task, length, score, prediction, answers, ...}), in the examples'
    order, on every rank. Each data-parallel rank answers its share (examples rank::dp)."""
    from megatron_refine.evaluation.metrics import score_example

    model.eval()
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = [(i, tokenizer.encode(ex.prompt), ex) for i, ex in enumerate(examples) if i % dp == rank]
    mine.sort(key=lambda item: len(item[1]))  # similar lengths together: fewer tokens past the budget per batch
    batches = list(_batches(mine, batch_size, max_batch_tokens))
    if progress and torch.distributed.get_rank() == 0:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch")
    results = []
    for batch in batches:
        outputs = generate_packed(model, [p for _, p, _ in batch], [ex.max_new_tokens for *_, ex in batch],
                                  tokenizer.eos_id)
        for (i, prompt, ex), out in zip(batch, outputs):
            text = tokenizer.decode([t for t in out if t != tokenizer.eos_id])
            results.append({"index": i, "task": ex.task, "length": ex.length, "prompt_tokens": len(prompt),
                            "score": score_example(ex, text), "prediction": text,
                            "answers": ex.answers, "metric": ex.metric, **({"meta": ex.meta} if ex.meta else {})})
    gathered = [None] * dp
    torch.distributed.all_gather_object(gathered, results, group=parallel_state.get_data_parallel_group())
    model.train()
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def confidence_interval(scores: list[float], z: float = 1.96) -> tuple[float, float]:
    """95% interval of the mean: Wilson's for 0/1 scores (exact-match style), else the normal approximation."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan)
    mean = sum(scores) / n
    if all(s in (0.0, 1.0) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1))
    return (max(0.0, mean - z * sd / math.sqrt(n)), min(1.0, mean + z * sd / math.sqrt(n)))


def summarize(results: list[dict]) -> list[dict]:
    """One row per (task, length) plus each task's average over lengths: n, mean score, 95% interval."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r["task"], r["length"]), []).append(r["score"])
    for r in results:  # after every length of its task
        groups.setdefault((r["task"], "all"), []).append(r["score"])
    order = {task: i for i, task in enumerate(dict.fromkeys(r["task"] for r in results))}
    rows = []
    for (task, length), scores in sorted(groups.items(), key=lambda item: (
            order[item[0][0]], item[0][1] == "all", item[0][1] if isinstance(item[0][1], int) else 0)):
        if length == "all" and sum(1 for t, _ in groups if t == task) == 2:
            continue  # one length only: its row says it all
        low, high = confidence_interval(scores)
        rows.append({"task": task, "length": length, "n": len(scores), "score": sum(scores) / len(scores),
                     "ci_low": low, "ci_high": high})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'task':<22} {'length':>7} {'n':>5} {'score':>7}  95% interval"]
    for r in rows:
        length = r["length"] if r["length"] is not None else "-"
        lines.append(f"{r['task']:<22} {length!s:>7} {r['n']:>5} {100 * r['score']:>6.1f}%  "
                     f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]")
    return "\n".join(lines)


def format_comparison(columns: dict[str, list[dict]]) -> str:
    """Several runs' summary rows side by side (one column a run: score and 95% interval), by task and length."""
    cell = lambda r: f"{100 * r['score']:5.1f}% [{100 * r['ci_low']:4.1f}, {100 * r['ci_high']:4.1f}]"  # noqa: E731
    width = max(len(cell({"score": 1, "ci_low": 1, "ci_high": 1})), *map(len, columns))
    by_run = {name: {(r["task"], r["length"]): r for r in rows} for name, rows in columns.items()}
    first = next(iter(columns.values()))
    lines = [f"{'task':<22} {'length':>7} {'n':>5}  " + "  ".join(f"{name:<{width}}" for name in columns)]
    for r in first:
        key = (r["task"], r["length"])
        cells = [cell(by_run[name][key]) if key in by_run[name] else "-" for name in columns]
        length = r["length"] if r["length"] is not None else "-"
        lines.append(f"{r['task']:<22} {length!s:>7} {r['n']:>5}  " + "  ".join(f"{c:<{width}}" for c in cells))
    return "\n".join(line.rstrip() for line in lines)


def write_results(out_dir: str | Path, results: list[dict], rows: list[dict], config: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "summary": rows, "examples": results}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["task", "length", "n", "score", "ci_low", "ci_high"])
        writer.writeheader()
        writer.writerows(rows)
