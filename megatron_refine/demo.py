"""`megatron-refine demo`: the README's main job, end to end on built-in data.

1. writes the built-in corpus (key-value registries, facts, needles) as tokenized webdataset shards;
2. trains a small DeltaNet with next-token prediction on local data-parallel ranks (2 gloo processes on
   a CPU) with Megatron's DDP, optimizer and schedules, saving an atomic dist checkpoint;
3. evaluates key-value recall on held-out registries (greedy decoding with the cached decoder);
4. writes a loss-curve PNG and TensorBoard scalars, and prints a summary table.
REFINE mid-training, further evaluations and HF export join this demo as they land.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from megatron_refine.runtime import spawn

CORPUS_SEED, RECALL_SEED = 0, 10_000  # the recall registries never appear in the training corpus


@dataclass
class DemoConfig:
    out_dir: str = "demo_output"
    nproc: int = 2
    steps: int = 240
    documents: int = 6000
    seq_length: int = 256
    micro_batch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    lr: float = 3e-3
    recall_examples: int = 100


def _train_config(cfg: DemoConfig, out: Path):
    from megatron_refine.training import load_config

    return load_config("tiny-deltanet", [
        f"data.path={out / 'data'}", f"data.seq_length={cfg.seq_length}",
        f"data.micro_batch_size={cfg.micro_batch_size}", f"data.global_batch_size={cfg.micro_batch_size * cfg.nproc}",
        f"model.overrides.hidden_size={cfg.hidden_size}", f"model.overrides.num_layers={cfg.num_layers}",
        "model.overrides.num_attention_heads=4", f"model.overrides.ffn_hidden_size={3 * cfg.hidden_size}",
        "model.overrides.delta_rule_chunk_size=64",
        f"optimizer.lr={cfg.lr}", f"optimizer.min_lr={cfg.lr / 10}", f"optimizer.warmup_steps={max(1, cfg.steps // 12)}",
        "optimizer.weight_decay=0.01", f"train_steps={cfg.steps}", f"logging.log_interval={max(1, cfg.steps // 12)}",
        f"logging.tensorboard_dir={out / 'tensorboard'}", f"checkpoint.save={out / 'checkpoints'}",
    ])


def _run_rank(cfg: DemoConfig, out: Path) -> dict:
    import torch

    from megatron_refine.data import ByteTokenizer, key_value_recall_examples
    from megatron_refine.evaluation import key_value_recall
    from megatron_refine.training import train

    result = train(_train_config(cfg, out))
    recall = key_value_recall(result.model, ByteTokenizer(), key_value_recall_examples(cfg.recall_examples, RECALL_SEED))
    parameters = sum(p.numel() for p in result.model.parameters())
    return {"losses": result.losses, "tokens_per_s": result.tokens_per_s, "checkpoint": result.checkpoint,
            "recall": recall, "parameters": parameters, "world": torch.distributed.get_world_size()}


def _plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(range(1, len(losses) + 1), losses, lw=1.2)
    ax.set(xlabel="step", ylabel="NTP loss (nats/token)", title="megatron-refine demo: DeltaNet NTP on the built-in corpus")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(cfg: DemoConfig) -> dict:
    from megatron_refine.data import write_builtin_corpus

    start = time.perf_counter()
    out = Path(cfg.out_dir)
    print(f"megatron-refine demo -> {out}/", flush=True)
    meta = write_builtin_corpus(out / "data", cfg.documents, CORPUS_SEED, shard_size=max(1, cfg.documents // 8),
                                progress=False)
    print(f"corpus: {meta['num_documents']:,d} documents, {meta['num_tokens']:,d} byte tokens in "
          f"{len(meta['shards'])} shards", flush=True)
    result = spawn(_run_rank, cfg.nproc, cfg, out, timeout=3600)[0]
    _plot(result["losses"], out / "loss.png")
    losses, recall = result["losses"], result["recall"]
    rows = [
        ("model", f"DeltaNet, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {result['parameters']:,d} parameters"),
        ("layout", f"{result['world']} gloo ranks, data parallel"),
        ("training", f"{len(losses)} steps x {cfg.micro_batch_size * cfg.nproc} sequences x {cfg.seq_length} tokens"),
        ("NTP loss", f"{losses[0]:.3f} -> {losses[-1]:.3f} nats/token"),
        ("throughput", f"{result['tokens_per_s']:,.0f} tokens/s"),
        ("key-value recall", f"{recall.exact_match:.1%} exact, {recall.char_accuracy:.1%} of value digits "
                             f"({recall.examples} held-out registries; chance: 0.1% exact, 10% of digits)"),
        ("checkpoint", str(result["checkpoint"])),
        ("loss curve", str(out / "loss.png")),
        ("tensorboard", str(out / "tensorboard")),
        ("wall time", f"{time.perf_counter() - start:.0f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}} | {v}" for k, v in rows), flush=True)
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"the demo did not learn: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return result
