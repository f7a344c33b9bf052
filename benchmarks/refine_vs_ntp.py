"""REFINE vs NTP on the demo's task, over several seeds and continuation budgets (CPU is enough; hours, not minutes).

    python benchmarks/refine_vs_ntp.py                                  # seeds 0 1 2, budgets 100 300
    python benchmarks/refine_vs_ntp.py --seeds 0 1 2 3 4 --budgets 100 300 1000 --eval-samples 300

For each seed: pretrain the demo's DeltaNet with NTP (`megatron-refine demo`'s model, corpus and schedule; the
seed sets the initialisation, the data order and REFINE's sampling), then continue from that checkpoint for each
budget twice, with REFINE mid-training and with NTP only (the same steps, data and learning rate), and score all
of them on the same held-out recall task file (`megatron-refine eval`'s path: packed greedy decoding, RULER's
metrics). The pretrained model is each seed's step-0 point.

Writes to --out-dir: `results.csv` (seed, budget, method, task, n, score), `summary.md` (per task and budget: the
mean over seeds of each method, and the paired difference REFINE - NTP with its standard error over seeds) and
`refine_vs_ntp.png` (score against continuation steps, one panel a task, each seed's runs faint).
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import csv
import statistics
import time
from dataclasses import replace
from pathlib import Path

from megatron_refine.demo import (
    CORPUS_SEED, RECALL_SEED, DemoConfig, continuation, read_recall_tasks, refine_mid, resolve_devices, train_and_score)
from megatron_refine.runtime import spawn

METHODS = {"ntp": "NTP", "refine": "REFINE"}


def _seed_runs(cfg: DemoConfig, out: Path, data: Path, task_file: Path, seed: int, budgets: list[int]) -> list[dict]:
    """One seed: pretrain, then each budget's two continuations, each model scored on the task file."""
    import torch

    examples = read_recall_tasks(cfg, task_file)

    def seeded(config):
        return replace(config, seed=seed, data=replace(config.data, seed=seed, path=str(data)),
                       refine=replace(config.refine, seed=seed))

    rows = []

    def run(name, budget, method, *changes):
        start = time.perf_counter()
        _, summary = train_and_score(cfg, out, name, task_file, examples, seeded, *changes)
        rows.extend({"seed": seed, "budget": budget, "method": method, "task": r["task"], "n": r["n"],
                     "score": r["score"]} for r in summary)
        if torch.distributed.get_rank() == 0:
            print(f"seed {seed}: {name} in {time.perf_counter() - start:.0f}s", flush=True)

    run("ntp", 0, "pretrained")
    for budget in budgets:
        continued = continuation(cfg, out, budget)
        run(f"refine-{budget}", budget, "refine", continued, refine_mid)
        run(f"ntp-{budget}", budget, "ntp", continued)
    return rows


def summary_table(rows: list[dict], budgets: list[int]) -> str:
    """Markdown: per task and budget, each method's mean over seeds and REFINE - NTP (paired by seed) +- s.e."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    score = {(r["seed"], r["budget"], r["method"], r["task"]): r["score"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| task | steps | pretrained | NTP | REFINE | REFINE - NTP (s.e.) |", "|---|---|---|---|---|---|"]
    for task in tasks:
        base = statistics.mean(score[s, 0, "pretrained", task] for s in seeds)
        for budget in budgets:
            ntp = [score[s, budget, "ntp", task] for s in seeds]
            refine = [score[s, budget, "refine", task] for s in seeds]
            diff = [b - a for a, b in zip(ntp, refine)]
            se = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else float("nan")
            means = " | ".join(f"{100 * statistics.mean(x):.1f}%" for x in (ntp, refine))
            lines.append(f"| {task} | +{budget} | {100 * base:.1f}% | {means} | "
                         f"{100 * statistics.mean(diff):+.1f} ({100 * se:.1f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    score = {(r["seed"], r["budget"], r["method"], r["task"]): 100 * r["score"] for r in rows}
    steps = [0, *budgets]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.4), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, style in (("ntp", dict(color="tab:blue", ls="--")), ("refine", dict(color="tab:red", ls="-"))):
            curves = [[score[s, 0, "pretrained", task]] + [score[s, b, method, task] for b in budgets] for s in seeds]
            for curve in curves:
                ax.plot(steps, curve, alpha=0.25, lw=0.8, **style)
            ax.plot(steps, [statistics.mean(c) for c in zip(*curves)], lw=2, marker="o", label=METHODS[method], **style)
        ax.set(title=task, xlabel="continuation steps", ylabel="score (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"REFINE vs NTP continuation of the demo's DeltaNet ({len(seeds)} seeds; faint: one seed)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 300], help="continuation steps")
    parser.add_argument("--pretrain-steps", dest="steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--eval-samples", dest="eval_samples", type=int, default=200, help="examples a task")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--nproc", type=int)
    parser.add_argument("--out-dir", dest="out_dir", default="benchmark_output/refine_vs_ntp")
    args = parser.parse_args()

    from megatron_refine.data import write_builtin_corpus
    from megatron_refine.evaluation.recall_tasks import recall_examples, write_task_file

    out = Path(args.out_dir)
    cfg = resolve_devices(replace(DemoConfig(), out_dir=str(out), steps=args.steps, eval_samples=args.eval_samples,
                                  device=args.device, nproc=args.nproc))
    data = out / "data"
    write_builtin_corpus(data, cfg.documents, CORPUS_SEED, shard_size=max(1, cfg.documents // 8), progress=False)
    task_file = write_task_file(recall_examples(cfg.eval_samples, RECALL_SEED), out / "recall.jsonl")
    rows = []
    for seed in args.seeds:
        rows += spawn(_seed_runs, cfg.nproc, cfg, out / f"seed{seed}", data, task_file, seed, args.budgets,
                      timeout=6 * 3600)[0]
        with open(out / "results.csv", "w", newline="") as f:  # after every seed: a long run keeps what it has
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    table = summary_table(rows, args.budgets)
    (out / "summary.md").write_text(
        f"seeds {args.seeds}, NTP pretraining {cfg.steps} steps, {cfg.eval_samples} held-out examples a task\n\n"
        + table + "\n")
    plot(rows, args.budgets, out / "refine_vs_ntp.png")
    print(table)
    print(f"wrote {out / 'results.csv'}, {out / 'summary.md'}, {out / 'refine_vs_ntp.png'}")


if __name__ == "__main__":
    main()
