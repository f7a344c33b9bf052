"""megatron-core 0.16.1 through 0.19.x: one adapter for each API difference this project meets.

Python 3.11 gets megatron-core 0.16.1 at most (0.17+ require Python >= 3.12), so both ends are supported.
Every difference between them that our code touches is adapted here, once, named for what it adapts; the
rest of the package imports these names and never checks a version itself. Each adapter says which release
changed what (0.17 and 0.18 are as 0.16.1 in all of them), and tests/test_megatron_compat.py covers it on
whichever end is installed (CI runs both). The CPU-only patches live in runtime/cpu_compat.py, which uses
`MEGATRON_CORE_VERSION` to skip those whose target a release lacks. When the oldest supported release moves
past a change, delete its adapter.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.version import Version

MEGATRON_CORE_VERSION = Version(version("megatron-core"))


# Gated DeltaNet's helper that saves a fused ShardedTensor as named pieces (so a fused projection reshards across
# TP sizes): 0.16.1 defines it in ssm/gated_delta_net.py; 0.19 turned that module into a package and moved the
# helper, unchanged, to ssm/utils.py. (0.16.1's module imports fla, which probes the GPU: the launcher's modules
# must not import this one; runtime/cpu_compat.py reads MEGATRON_CORE_VERSION only when a CPU runtime starts.)
try:
    from megatron.core.ssm.utils import _split_tensor_factory as split_tensor_factory
except ImportError:  # megatron-core < 0.19
    from megatron.core.ssm.gated_delta_net import _split_tensor_factory as split_tensor_factory


def mlp_submodule(submodules):
    """A TransformerLayer's `mlp` submodule for megatron-core's dense MLP with these `MLPSubmodules`. 0.19 builds
    it through the `MLP.as_mlp_submodule` classmethod (a ModuleSpec of MLP still works there, rewrapped with a
    warning at every layer); 0.16.1 takes `ModuleSpec(MLP)` and has no such method."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


# Where a dist checkpoint keeps its common (non-tensor) state: up to 0.18, dist_checkpointing.save writes it to
# common.pt, which is all those releases read; 0.19 stores it as one ShardedObject, "common_state", inside the
# torch_dist files, and reads a common.pt first where one exists.
COMMON_STATE_FILE = "common.pt"
COMMON_STATE_KEY = "common_state"
COMMON_STATE_IN_TORCH_DIST = MEGATRON_CORE_VERSION >= Version("0.19")


def write_common_state_file(checkpoint_dir: str | Path, state: dict) -> None:
    """Give a checkpoint the common.pt every supported release reads (on rank 0, after the save of `state`, the
    state dict given to dist_checkpointing.save): on 0.19, the common state that save put inside the torch_dist
    files, so a checkpoint written there loads on 0.16.1 too. Where the release wrote common.pt itself, nothing
    to do. The common state is what save keeps of `state`: all but its sharded and its non-persistent items."""
    from megatron.core.dist_checkpointing.utils import extract_nonpersistent, extract_sharded_base

    path = Path(checkpoint_dir) / COMMON_STATE_FILE
    if not path.exists():
        torch.save(extract_sharded_base(extract_nonpersistent(state)[1])[1], path)


def common_state_object(common_state: dict):
    """The ShardedObject holding `common_state` that 0.19's dist_checkpointing.save adds to what it writes (for a
    writer that plans the torch_dist files itself, as the streamed HF import does); None before 0.19."""
    if not COMMON_STATE_IN_TORCH_DIST:
        return None
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key=COMMON_STATE_KEY, data=common_state, global_shape=(1,), global_offset=(0,), replica_id=0)


__all__ = [
    "COMMON_STATE_FILE",
    "COMMON_STATE_IN_TORCH_DIST",
    "COMMON_STATE_KEY",
    "MEGATRON_CORE_VERSION",
    "common_state_object",
    "mlp_submodule",
    "split_tensor_factory",
    "write_common_state_file",
]
