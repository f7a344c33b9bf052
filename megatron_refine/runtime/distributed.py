"""Process group, Megatron parallel state and RNG: one call to set up, one to tear down.

Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without
it, runs as a single process. NCCL on CUDA, gloo on CPU (where the CPU compatibility patches are applied first).
The device is CUDA when the host has one, unless the caller asks for `device="cpu"` (the CPU tests do, so the
suite passes on a GPU host too).
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


_current: Runtime | None = None


def current_device() -> torch.device:
    """The device of the runtime `initialize` set up in this process; before (or after `destroy`), CUDA's current
    device when the host has one, else the CPU. What model builders and checkpoints consult instead of
    `torch.cuda.is_available()`, which is also true for a CPU runtime on a GPU host."""
    if _current is not None:
        return _current.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def local_gpus(device: str | None = None) -> int:
    """GPUs a run on `device` (default CUDA when available) has on this node: 0 for a CPU run."""
    return torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0


def _cuda_device(local_rank: int) -> torch.device:
    """One GPU per local rank: more local ranks than GPUs would share a device, which NCCL refuses."""
    gpus = torch.cuda.device_count()
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    if local_world > gpus or local_rank >= gpus:
        raise ValueError(
            f"{local_world} ranks on this node but {gpus} GPU(s): start at most {gpus} (torchrun --nproc-per-node "
            f"{gpus}, or --nproc {gpus}), or run on the CPU (device='cpu', config device=cpu)"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


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
    device: str | None = None,
    backend: str | None = None,
    timeout_minutes: int = 30,
) -> Runtime:
    """Initialise torch.distributed, Megatron's parallel_state and RNG for this process.

    Args:
        tp, pp, cp: tensor-, pipeline- and context-parallel sizes; data parallelism takes the rest.
        seed: base seed (see `set_random_seed`).
        device: "cuda" (one GPU per local rank) or "cpu" (gloo, with megatron-core's CPU compatibility patches
            applied until `destroy`); default CUDA when available, else CPU.
        backend: "nccl" or "gloo"; default NCCL on CUDA, gloo on CPU.
    """
    global _current
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    layout = ParallelLayout(world_size, tp, pp, cp)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this host has no CUDA (or torch is a CPU build): use device='cpu'")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend 'nccl' needs CUDA tensors: use backend='gloo' on the CPU")
    if device == "cuda":
        if cpu_compat.is_applied():
            raise RuntimeError("this process ran a CPU runtime that was not destroyed: call destroy() first")
        torch_device = _cuda_device(local_rank)
    else:
        cpu_compat.apply()
        torch_device = torch.device("cpu")

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
    _current = Runtime(rank, local_rank, layout, torch_device, backend, seed)
    return _current


def destroy() -> None:
    """Tear down Megatron's parallel state, the process group and the CPU patches (safe to call twice)."""
    global _current
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_compat.revert()
    _current = None
