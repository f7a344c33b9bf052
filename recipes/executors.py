"""NeMo-Run executors for the recipes: torchrun on this machine, or Slurm with or without a container.

Slurm without pyxis / enroot (bare metal) is the default: the batch script activates a virtualenv (`venv`, one
that has this project installed, e.g. `pip install -e .` on a shared file system) and srun starts torchrun on each
node; the sbatch text then holds no `--container-*` flag. With `container_image` srun runs torchrun inside the
image (pyxis), with `container_mounts`. torchrun's rendezvous: the first node's address (`head_node_ip`, from
`scontrol show hostnames`) on port 29500, `--nnodes`, `--nproc-per-node` = GPUs per node, `--node-rank
$SLURM_NODEID`. The NCCL defaults below are set unless `env` overrides them.
"""

from __future__ import annotations

import os
import sys

NCCL_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective ends the job instead of hanging it
    "NCCL_DEBUG": "WARN",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core's overlap of TP communication with compute expects it
    "OMP_NUM_THREADS": "1",
}


def local_executor(nproc_per_node: int, env: dict[str, str] | None = None):
    """torchrun with `nproc_per_node` processes on this machine (one per GPU, or gloo ranks on a CPU)."""
    import nemo_run as run

    # NeMo-Run starts the `torchrun` it finds on PATH: this interpreter's, even when its venv is not activated.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                             env_vars={**NCCL_DEFAULTS, **(env or {})})


def slurm_executor(*, account: str, partition: str, nodes: int, gpus_per_node: int = 8, time: str = "04:00:00",
                   container_image: str | None = None, container_mounts: list[str] = (), venv: str | None = None,
                   job_dir: str = "", env: dict[str, str] | None = None, exclusive: bool = True):
    """sbatch + srun + torchrun on `nodes` nodes. Bare metal (no `container_image`): `venv` is activated in the
    batch script. `job_dir` "" puts the scripts and logs under NeMo-Run's home (`$NEMORUN_HOME/experiments`)."""
    import nemo_run as run

    if container_image is None and venv is None:
        raise ValueError("a Slurm run without a container needs --venv (a virtualenv with megatron-refine installed, "
                         "on a file system every node sees), or give --container-image")
    return run.SlurmExecutor(
        account=account, partition=partition, nodes=nodes, ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node, time=time, launcher="torchrun", job_name_prefix="megatron-refine-",
        tunnel=run.LocalTunnel(job_dir=job_dir), packager=run.Packager(),  # the installed package, no code copy
        container_image=container_image, container_mounts=list(container_mounts),
        setup_lines=None if container_image else f"source {venv}/bin/activate",
        env_vars={**NCCL_DEFAULTS, **(env or {})}, exclusive=exclusive,
    )


__all__ = ["NCCL_DEFAULTS", "local_executor", "slurm_executor"]
