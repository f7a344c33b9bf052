"""python -m recipes --list | NAME --executor local|slurm [--nodes N] [--set k=v ...] [--dryrun]

The recipe's config is resolved and checked first (as `megatron-refine train` does, plus the layout against the
GPUs). `--dryrun` prints what would run and launches nothing: the torchrun command (local) or the whole sbatch
script (slurm). Without it, local runs torchrun here and waits; slurm submits the batch script with sbatch.
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import sys
import tempfile
from pathlib import Path

from megatron_refine.arguments import positive_int
from recipes import RECIPES, get_recipe

EXPERIMENT = "megatron-refine"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipes", description="NeMo-Run recipes for megatron-refine.")
    p.add_argument("name", nargs="?", help="a recipe (--list shows them)")
    p.add_argument("--list", action="store_true", help="list the recipes and their layouts")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nodes", type=positive_int, help="nodes (default: the recipe's); the layout's DP grows with them")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training config override")
    p.add_argument("--dryrun", action="store_true", help="print the torchrun command or sbatch script; launch nothing")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--account")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--container-image", dest="container_image", help="run inside this image (pyxis / enroot)")
    slurm.add_argument("--container-mounts", dest="container_mounts", default="", help="comma-separated src:dst")
    slurm.add_argument("--venv", help="bare metal: the virtualenv to activate on the nodes")
    slurm.add_argument("--job-dir", dest="job_dir", default="", help="where scripts and logs go (default: NeMo-Run's)")
    return p


def list_recipes() -> str:
    lines = [f"{'name':<24} {'nodes':>5} {'GPUs':>4} {'TP':>3} {'SP':>3} {'PP':>3}  description"]
    for r in RECIPES.values():
        lines.append(f"{r.name:<24} {r.nodes:>5} {r.nodes * r.gpus_per_node:>4} {r.tensor_model_parallel_size:>3} "
                     f"{'yes' if r.sequence_parallel else 'no':>3} {r.pipeline_model_parallel_size:>3}  {r.description}")
    return "\n".join(lines)


def executor_for(args, recipe):
    from recipes.executors import local_executor, slurm_executor

    nodes = args.nodes or recipe.nodes
    if args.executor == "local":
        if nodes > 1:
            raise ValueError(f"--executor local runs on this machine: {recipe.name} wants {nodes} nodes, use "
                             "--executor slurm (or --nodes 1)")
        return local_executor(recipe.gpus_per_node)
    missing = [flag for flag, value in (("--account", args.account), ("--partition", args.partition)) if not value]
    if missing:
        raise ValueError(f"--executor slurm needs {' and '.join(missing)}")
    mounts = [m for m in args.container_mounts.split(",") if m]
    return slurm_executor(account=args.account, partition=args.partition, nodes=nodes,
                          gpus_per_node=recipe.gpus_per_node, time=args.time, container_image=args.container_image,
                          container_mounts=mounts, venv=args.venv, job_dir=args.job_dir)


def torchrun_command(task, executor) -> str:
    """The command NeMo-Run's local scheduler would start, without starting it."""
    from nemo_run.run.torchx_backend.packaging import package

    executor.job_dir = tempfile.mkdtemp(prefix="megatron-refine-dryrun-")
    role = package("train", task, executor, serialize_metadata_for_scripts=False).roles[0]
    return " ".join([role.entrypoint, *role.args])


def sbatch_script(task, executor, name: str) -> str:
    """The batch script NeMo-Run would submit, written by its dry run (nothing is submitted)."""
    import nemo_run as run

    with run.Experiment(f"{EXPERIMENT}-{name}", executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        return (Path(exp.jobs[0].executor.experiment_dir) / f"{name}_sbatch.sh").read_text()


def launch(task, executor, name: str, local: bool) -> bool:
    """Run (local: wait for torchrun to finish; slurm: submit and return). True when it succeeded / was queued."""
    import nemo_run as run
    from torchx.specs import AppState

    with run.Experiment(f"{EXPERIMENT}-{name}", executor=executor, log_level="WARN") as exp:
        exp.add(task, name=name, tail_logs=local)
        exp.run(detach=not local)
    return not local or exp.jobs[0].state == AppState.SUCCEEDED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list or not args.name:
        print(list_recipes())
        return 0
    try:
        recipe = get_recipe(args.name)
        recipe.resolve(args.set, args.nodes)
        task, executor = recipe.task(args.set), executor_for(args, recipe)
    except ValueError as e:
        print(f"python -m recipes: error: {e}", file=sys.stderr)
        return 2
    if args.dryrun:
        print(torchrun_command(task, executor) if args.executor == "local" else sbatch_script(task, executor, recipe.name))
        return 0
    return 0 if launch(task, executor, recipe.name, args.executor == "local") else 1


if __name__ == "__main__":
    sys.exit(main())
