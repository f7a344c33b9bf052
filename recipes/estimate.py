"""Per-GPU memory and step time of a recipe or a training config, from shapes alone (no GPU): tools/estimate.py.

    python tools/estimate.py midtrain_deltanet_7b                 # a recipe of recipes/ (its layout and nodes)
    python tools/estimate.py --config refine-mid-deltanet-1p3b --gpus 8 --set parallel.tensor_model_parallel_size=2
    python tools/estimate.py --all                                # every recipe, as the table in docs/scaling.md
    python tools/estimate.py --largest                            # the largest DeltaNet fitting REFINE at 16K tokens
    python tools/estimate.py --longest                            # the longest document 1.3B and 7B fit (CP, TP)
    python tools/estimate.py --cp-sweep deltanet_1p3b --seq-length 65536      # per-GPU memory vs CP at one length

The model (megatron_refine/training/estimate.py): bf16 weights, fp32 gradients, the distributed optimizer's 12
bytes a parameter over DP, activations counted per token from the layer code (full recomputation when the config
asks for it), REFINE's branch and decode states, context parallelism's pieces and gathers; the step time at --mfu
of an H100's dense bf16 peak.
"""

import argparse
import sys

from megatron_refine.arguments import fraction, positive_int
from megatron_refine.models import PUBLISHED_VOCAB_SIZE, get_config
from megatron_refine.training import load_config
from megatron_refine.training.estimate import (FIT_GIB, Layout, context_parallel_comm_bytes, estimate,
                                                longest_document)
from recipes import RECIPES, get_recipe

PARTS = ("weights", "gradients", "optimizer", "activations", "refine", "total")
# A DeltaNet family in the 1.3B's proportions (head dim 128): hidden, layers.
FAMILY = [(2048, 24), (2560, 32), (3072, 32), (4096, 32), (5120, 40), (6144, 48), (8192, 48), (8192, 64)]
LONG_CONTEXT_MODELS = ("deltanet_1p3b", "gated_deltanet_1p3b", "deltanet_7b")
MIB = 1024**2


def layout_of(cfg, gpus: int) -> Layout:
    par, data, overrides = cfg.parallel, cfg.data, cfg.model.overrides
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if gpus % model_parallel:
        raise ValueError(f"--gpus {gpus} is not a multiple of TP x PP x CP = {par.tensor_model_parallel_size} x "
                         f"{par.pipeline_model_parallel_size} x {par.context_parallel_size}: data parallelism needs "
                         "whole model replicas")
    return Layout(gpus=gpus, tensor_model_parallel_size=par.tensor_model_parallel_size,
                  pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                  sequence_parallel=par.sequence_parallel, micro_batch_size=data.micro_batch_size,
                  seq_length=data.seq_length, global_batch_size=data.global_batch_size,
                  recompute=overrides.get("recompute_granularity") == "full", refine=cfg.uses_refine,
                  n_chunks=cfg.refine.n_chunks, rollouts=cfg.refine.n, k=cfg.refine.k,
                  context_parallel_size=par.context_parallel_size)


def estimate_config(cfg, gpus: int, vocab_size: int, mfu: float) -> dict:
    model = get_config(cfg.model.config, **cfg.model.overrides)
    return estimate(model, vocab_size, layout_of(cfg, gpus), mfu)


def recipe_row(name: str, vocab_size: int | None, mfu: float, extra: list[str] = ()) -> dict:
    """A recipe's estimate (with `extra` overrides) at `vocab_size`, or (None) its checkpoint's vocabulary or else
    the published one."""
    recipe = get_recipe(name)
    cfg = recipe.resolve(extra)
    gpus = recipe.nodes * recipe.gpus_per_node
    return {"name": name, "model": cfg.model.config, "gpus": gpus, "layout": _layout_text(cfg, gpus),
            **estimate_config(cfg, gpus, vocab_size or recipe.vocab_size or PUBLISHED_VOCAB_SIZE, mfu)}


def _layout_text(cfg, gpus: int) -> str:
    recompute = cfg.model.overrides.get("recompute_granularity") == "full"
    return _layout_words(layout_of(cfg, gpus)) + (", recompute" if recompute else "")


def _layout_words(layout: Layout) -> str:
    cp = layout.context_parallel_size
    return (f"TP {layout.tensor_model_parallel_size}{' + SP' if layout.sequence_parallel else ''}, "
            f"PP {layout.pipeline_model_parallel_size}{f', CP {cp}' if cp > 1 else ''}, "
            f"DP {layout.data_parallel_size}")


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K"


def table(rows: list[dict]) -> str:
    head = "| recipe | model | parameters | GPUs | layout | " + " | ".join(PARTS) + " (GiB) | tokens/step | step s @ MFU |"
    lines = [head, "|" + "---|" * (8 + len(PARTS) - 1)]
    for r in rows:
        lines.append(f"| {r['name']} | {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['gpus']} | {r['layout']} | "
                     + " | ".join(f"{r[p]:.1f}" for p in PARTS)
                     + f" | {r['tokens_per_step']:,d} | {r['step_seconds']:.1f} |")
    return "\n".join(lines)


def largest(vocab_size: int, gpu_counts=(8, 16, 32, 64)) -> str:
    """For each GPU count: the largest model of FAMILY whose REFINE mid-training (16K tokens, 32 documents a step)
    stays under FIT_GIB a GPU, at the smallest TP of 1-8 (+ SP); REFINE takes no activation recomputation."""
    from megatron_refine.models.config import fla_intermediate_size

    lines = ["| GPUs | largest model | parameters | layout | GiB per GPU |", "|---|---|---|---|---|"]
    for gpus in gpu_counts:
        best = None
        for hidden, layers in FAMILY:
            model = get_config("deltanet_1p3b", hidden_size=hidden, num_layers=layers, num_attention_heads=hidden // 128,
                               ffn_hidden_size=fla_intermediate_size(hidden))
            fits = [(tp, estimate(model, vocab_size, Layout(gpus=gpus, tensor_model_parallel_size=tp,
                                                            sequence_parallel=tp > 1, refine=True)))
                    for tp in (1, 2, 4, 8) if (hidden // 128) % tp == 0 and 32 % (gpus // tp) == 0]
            fits = [(tp, e) for tp, e in fits if e["total"] <= FIT_GIB]
            if fits:
                best = (hidden, layers, *fits[0])
        if best:
            hidden, layers, tp, e = best
            lines.append(f"| {gpus} | hidden {hidden}, {layers} layers | {e['parameters'] / 1e9:.1f}B | TP {tp}"
                         f"{' + SP' if tp > 1 else ''} | {e['total']:.1f} |")
        else:
            lines.append(f"| {gpus} | none of the family | - | - | - |")
    return "\n".join(lines)


def longest_table(vocab_size: int, gpus: int, models=LONG_CONTEXT_MODELS) -> str:
    """For each model, NTP and REFINE: the longest document (4K-1M tokens, one a micro-batch) whose estimate stays
    under FIT_GIB a GPU on `gpus` GPUs, at the smallest TP x CP that fits it (`longest_document`)."""
    lines = ["| model | parameters | stage | longest document | layout | GiB per GPU | CP traffic per layer (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for name in models:
        config = get_config(name)
        for stage, refine in (("NTP", False), ("REFINE", True)):
            found = longest_document(config, vocab_size, gpus, refine)
            if found is None:
                lines.append(f"| {name} | - | {stage} | under 4K | - | - | - |")
                continue
            length, layout, e = found
            comm = max(context_parallel_comm_bytes(config, layout)) / MIB
            lines.append(f"| {name} | {e['parameters'] / 1e9:.2f}B | {stage} | {_tokens(length)} | "
                         f"{_layout_words(layout)} | {e['total']:.1f} | {comm:.1f} |")
    return "\n".join(lines)


def cp_sweep(name: str, vocab_size: int, gpus: int, seq_length: int, tp: int) -> str:
    """Per-GPU memory of `name` at `seq_length` tokens a document (one a micro-batch) on `gpus` GPUs at TP `tp`
    (+ SP) for each CP of 1, 2, 4, 8 that fits the GPUs: NTP and REFINE, and the CP traffic per layer."""
    config = get_config(name, tensor_model_parallel_size=tp)
    lines = ["| CP | layout | weights + gradients + optimizer | NTP activations | NTP total | REFINE part | "
             "REFINE total (GiB) | CP traffic per layer (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for cp in (1, 2, 4, 8):
        if gpus % (tp * cp):
            continue
        layouts = [Layout(gpus=gpus, tensor_model_parallel_size=tp, sequence_parallel=tp > 1, micro_batch_size=1,
                          seq_length=seq_length, refine=refine, context_parallel_size=cp)
                   for refine in (False, True)]
        ntp, refine = (estimate(config, vocab_size, layout) for layout in layouts)
        state = ntp["weights"] + ntp["gradients"] + ntp["optimizer"]
        comm = max(context_parallel_comm_bytes(config, layouts[0])) / MIB
        lines.append(f"| {cp} | {_layout_words(layouts[0])} | {state:.1f} | {ntp['activations']:.1f} | "
                     f"{ntp['total']:.1f} | {refine['refine']:.1f} | {refine['total']:.1f} | {comm:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/estimate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("name", nargs="?", help="a recipe (python -m recipes --list)")
    p.add_argument("--config", help="a training config instead: a built-in name or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides (with --config)")
    p.add_argument("--gpus", type=positive_int, default=8, help="GPUs of a --config run (default 8)")
    p.add_argument("--vocab-size", dest="vocab_size", type=positive_int,
                   help=f"default: a recipe's checkpoint's, else {PUBLISHED_VOCAB_SIZE:,d}")
    p.add_argument("--mfu", type=fraction, default=0.4,
                   help="model FLOPs utilisation for the step time, in (0, 1] (default 0.4)")
    p.add_argument("--all", action="store_true", help="every recipe, as a markdown table")
    p.add_argument("--largest", action="store_true", help="the largest model fitting REFINE at 16K tokens per GPU count")
    p.add_argument("--context-parallel-size", dest="context_parallel_size", type=positive_int,
                   help="CP of a recipe or --config run (parallel.context_parallel_size)")
    p.add_argument("--longest", action="store_true",
                   help=f"the longest document {', '.join(LONG_CONTEXT_MODELS)} fit on --gpus, NTP and REFINE")
    p.add_argument("--cp-sweep", dest="cp_sweep", metavar="MODEL",
                   help="a model preset's per-GPU memory vs CP at --seq-length on --gpus, at "
                        "--tensor-parallel-size")
    p.add_argument("--seq-length", dest="seq_length", type=positive_int, default=65536,
                   help="tokens a document for --cp-sweep (default 65536)")
    p.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=positive_int, default=1,
                   help="TP for --cp-sweep, with SP when > 1 (default 1)")
    args = p.parse_args(argv)
    extra = [] if args.context_parallel_size is None else [
        f"parallel.context_parallel_size={args.context_parallel_size}"]
    vocab = args.vocab_size or PUBLISHED_VOCAB_SIZE
    try:
        if args.largest:
            print(largest(vocab))
        elif args.longest:
            print(longest_table(vocab, args.gpus))
        elif args.cp_sweep:
            print(cp_sweep(args.cp_sweep, vocab, args.gpus, args.seq_length, args.tensor_parallel_size))
        elif args.all:
            print(table([recipe_row(name, args.vocab_size, args.mfu) for name in RECIPES]))
        elif args.config:
            cfg = load_config(args.config, [*args.set, *extra])
            row = {"name": args.config, "model": cfg.model.config, "gpus": args.gpus,
                   "layout": _layout_text(cfg, args.gpus), **estimate_config(cfg, args.gpus, vocab, args.mfu)}
            print(table([row]))
        elif args.name:
            print(table([recipe_row(args.name, args.vocab_size, args.mfu, extra)]))
        else:
            p.error("give a recipe name, --config, --all, --largest, --longest or --cp-sweep")
    except ValueError as e:
        print(f"tools/estimate.py: error: {e}", file=sys.stderr)
        return 2
    return 0

