"""Per-GPU memory and step time of a recipe or a training config, from shapes alone (no GPU): tools/estimate.py.

    python tools/estimate.py midtrain_deltanet_7b                 # a recipe of recipes/ (its layout and nodes)
    python tools/estimate.py --config refine-mid-deltanet-1p3b --gpus 8 --set parallel.tensor_model_parallel_size=2
    python tools/estimate.py --all                                # every recipe, as the table in docs/scaling.md
    python tools/estimate.py --largest                            # the largest DeltaNet fitting REFINE at 16K tokens

The model (megatron_refine/training/estimate.py): bf16 weights, fp32 gradients, the distributed optimizer's 12
bytes a parameter over DP, activations counted per token from the layer code (full recomputation when the config
asks for it), REFINE's branch and decode states; the step time at --mfu of an H100's dense bf16 peak.
"""

import argparse
import sys

from megatron_refine.arguments import fraction, positive_int
from megatron_refine.models import PUBLISHED_VOCAB_SIZE, get_config
from megatron_refine.training import load_config
from megatron_refine.training.estimate import FIT_GIB, Layout, estimate
from recipes import RECIPES, get_recipe

PARTS = ("weights", "gradients", "optimizer", "activations", "refine", "total")
# A DeltaNet family in the 1.3B's proportions (head dim 128): hidden, layers.
FAMILY = [(2048, 24), (2560, 32), (3072, 32), (4096, 32), (5120, 40), (6144, 48), (8192, 48), (8192, 64)]


def layout_of(cfg, gpus: int) -> Layout:
    par, data, overrides = cfg.parallel, cfg.data, cfg.model.overrides
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    if gpus % model_parallel:
        raise ValueError(f"--gpus {gpus} is not a multiple of TP x PP = {par.tensor_model_parallel_size} x "
                         f"{par.pipeline_model_parallel_size}: data parallelism needs whole model replicas")
    return Layout(gpus=gpus, tensor_model_parallel_size=par.tensor_model_parallel_size,
                  pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                  sequence_parallel=par.sequence_parallel, micro_batch_size=data.micro_batch_size,
                  seq_length=data.seq_length, global_batch_size=data.global_batch_size,
                  recompute=overrides.get("recompute_granularity") == "full", refine=cfg.uses_refine,
                  n_chunks=cfg.refine.n_chunks, rollouts=cfg.refine.n, k=cfg.refine.k)


def estimate_config(cfg, gpus: int, vocab_size: int, mfu: float) -> dict:
    model = get_config(cfg.model.config, **cfg.model.overrides)
    return estimate(model, vocab_size, layout_of(cfg, gpus), mfu)


def recipe_row(name: str, vocab_size: int | None, mfu: float) -> dict:
    """A recipe's estimate at `vocab_size`, or (None) its checkpoint's vocabulary or else the published one."""
    recipe = get_recipe(name)
    cfg = recipe.resolve()
    gpus = recipe.nodes * recipe.gpus_per_node
    return {"name": name, "model": cfg.model.config, "gpus": gpus, "layout": _layout_text(cfg, gpus),
            **estimate_config(cfg, gpus, vocab_size or recipe.vocab_size or PUBLISHED_VOCAB_SIZE, mfu)}


def _layout_text(cfg, gpus: int) -> str:
    par = cfg.parallel
    dp = gpus // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
    recompute = cfg.model.overrides.get("recompute_granularity") == "full"
    return (f"TP {par.tensor_model_parallel_size}{' + SP' if par.sequence_parallel else ''}, "
            f"PP {par.pipeline_model_parallel_size}, DP {dp}{', recompute' if recompute else ''}")


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
    args = p.parse_args(argv)
    try:
        if args.largest:
            print(largest(args.vocab_size or PUBLISHED_VOCAB_SIZE))
        elif args.all:
            print(table([recipe_row(name, args.vocab_size, args.mfu) for name in RECIPES]))
        elif args.config:
            cfg = load_config(args.config, args.set)
            vocab_size = args.vocab_size or PUBLISHED_VOCAB_SIZE
            row = {"name": args.config, "model": cfg.model.config, "gpus": args.gpus,
                   "layout": _layout_text(cfg, args.gpus), **estimate_config(cfg, args.gpus, vocab_size, args.mfu)}
            print(table([row]))
        elif args.name:
            print(table([recipe_row(args.name, args.vocab_size, args.mfu)]))
        else:
            p.error("give a recipe name, --config, --all or --largest")
    except ValueError as e:
        print(f"tools/estimate.py: error: {e}", file=sys.stderr)
        return 2
    return 0

