"""`megatron-refine` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import warnings


def _info(args: argparse.Namespace) -> None:
    """What this installation can use: packages, CUDA, and which fast paths are available."""
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rows = {
        "megatron-refine": version("megatron-refine"),
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "flash-linear-attention": version("flash-linear-attention"),
        "transformer-engine": version("transformer-engine"),
        "apex": "installed" if importlib.util.find_spec("apex") else "not installed",
        "CUDA": f"{torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "not available",
        "backend": "nccl" if torch.cuda.is_available() else "gloo (CPU compatibility patches)",
    }
    width = max(map(len, rows))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows.items()))


def _demo(args: argparse.Namespace) -> None:
    from megatron_refine.demo import DemoConfig, run

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    run(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-refine",
        description="Fast-weight language models (DeltaNet, LaCT) trained with REFINE on megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the end-to-end demo on built-in data (the README's main job)")
    demo.add_argument("--steps", type=int, help="training steps (default 60)")
    demo.add_argument("--tp", type=int, help="tensor-parallel size (default 2)")
    demo.add_argument("--nproc", type=int, help="local processes (default 2)")
    demo.add_argument("--out-dir", dest="out_dir", help="where outputs go (default demo_output)")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="show versions, CUDA and the fast paths available")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
