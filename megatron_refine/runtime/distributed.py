"""Process group, Megatron parallel state and RNG: one call to set up, one to tear down.

Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, runs as a
single process. NCCL on CUDA, gloo on CPU (where the CPU compatibility patches are applied first).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_refine.runtime import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel sizes of a run; `data_parallel_size` is what is left of the world."""

    world_size: int
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1

    def __post_init__(self):
        sizes = {
            "tensor_model_parallel_size (tp)": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size (pp)": self.pipeline_model_parallel_size,
            "context_parallel_size (cp)": self.context_parallel_size,
        }
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive integer, got {size!r}")
        model_parallel = (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )
        if self.world_size % model_parallel != 0:
            divisors = [d for d in range(1, self.world_size + 1) if self.world_size % d == 0]
            raise ValueError(
                f"tp x pp x cp = {self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size}"
                f" x {self.context_parallel_size} = {model_parallel} does not divide the world size "
                f"{self.world_size}. Choose sizes whose product is one of {divisors}, or launch "
                f"a multiple of {model_parallel} processes (e.g. torchrun --nproc-per-node {model_parallel})."
            )

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )


@dataclass(frozen=True)
class Runtime:
    """What `initialize` set up."""

    rank: int
    local_rank: int
    layout: ParallelLayout
    device: torch.device
    backend: str
    seed: int

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _init_process_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"torch.distributed is already initialized as rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says rank {rank} of {world_size}"
            )
        return
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    elif world_size == 1:
        # Plain `python script.py`: a one-process group needs no rendezvous.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    else:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun "
            f"(torchrun --nproc-per-node {world_size} ...)"
        )


def set_deterministic() -> None:
    """Deterministic kernels wherever PyTorch has them (a warning names any op that has none), a fixed cuBLAS
    workspace, and NCCL's ring algorithm (call before the process groups exist for NCCL to see it). On CPU the
    stack is deterministic already; this is what makes a CUDA run repeat bitwise."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def set_random_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's tracker (data-, tensor- and expert-parallel streams).

    Same scheme as Megatron-LM: the default stream gets `seed`, the tensor-parallel stream `seed + 2718 +
    tp_rank`; pipeline stages are offset by 100 so each stage initialises its layers differently.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    seed: int = 1234,
    *,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> Runtime:
    """Initialise torch.distributed, Megatron's parallel_state and RNG for this process.

    Args:
        tp, pp, cp: tensor-, pipeline- and context-parallel sizes; data parallelism takes the rest.
        seed: base seed (see `set_random_seed`).
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, else gloo.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    layout = ParallelLayout(world_size, tp, pp, cp)

    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA; this host has none: use backend='gloo'")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.apply()
        device = torch.device("cpu")

    timeout = timedelta(minutes=timeout_minutes)
    _init_process_group(backend, rank, world_size, timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_random_seed(seed)
    return Runtime(rank, local_rank, layout, device, backend, seed)


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
