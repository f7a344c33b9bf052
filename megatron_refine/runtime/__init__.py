"""Distributed runtime: process groups, Megatron parallel state and RNG on CUDA (NCCL) or CPU (gloo)."""

from megatron_refine.runtime import cpu_compat
from megatron_refine.runtime.distributed import (
    ParallelLayout,
    Runtime,
    current_device,
    destroy,
    initialize,
    local_gpus,
    set_deterministic,
    set_random_seed,
)
from megatron_refine.runtime.launch import RankFailed, spawn

__all__ = [
    "ParallelLayout",
    "RankFailed",
    "Runtime",
    "cpu_compat",
    "current_device",
    "destroy",
    "initialize",
    "local_gpus",
    "set_deterministic",
    "set_random_seed",
    "spawn",
]
