"""Checkpoints: megatron-core dist_checkpointing, written atomically, with everything a resume needs.

Layout of a save folder:
    iter_0000100/                 a complete checkpoint (model, optimizer, scheduler, RNG, data position, config)
    latest_checkpointed_iteration.txt
A checkpoint is written to `iter_NNNNNNN.tmp` and renamed into place once every rank has finished; the
`latest` marker is replaced (atomically) only after that, and only then are old checkpoints pruned. A crash
mid-write leaves a `.tmp` folder that loading ignores (and the next save clears), never a half checkpoint.
Model weights load at any TP / PP / DP layout. The optimizer state resumes at another DP size too (the
distributed optimizer saves megatron-core's `dp_reshardable` format); it needs the saved TP / PP sizes. RNG and
data position are per DP rank: they resume exactly on the saved layout and restart from the seeds otherwise.
Weights saved with the local spec load into the Transformer-Engine spec and back (TE's `_extra_state`, its FP8
metadata, is skipped where the checkpoint lacks it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_refine.runtime import current_device

MARKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's format: one ShardedTensor per contiguous buffer shard, fully parallel save and
# load with no gather, reshardable across DP sizes (megatron-core's default, fully_sharded_model_space, builds
# flattened_range ShardedTensors that dist_checkpointing 0.16 refuses). Plain optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit() or not checkpoint_dir(root, int(text)).is_dir():
        raise RuntimeError(f"{marker} says {text!r}, which is not a complete checkpoint in {root}: fix or remove the marker")
    return int(text)


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if current_device().type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and current_device().type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])


def _per_rank_objects(rng, data) -> dict:
    """RNG differs per (pp, tp, dp) rank; the data position per DP rank (same on its TP / PP ranks)."""
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
    layout = _layout()
    return {
        "rng_state": ShardedObject("rng_state", rng, (layout["pp"], layout["tp"], layout["dp"]), (pp, tp, dp), replica_id=0),
        "data_state": ShardedObject("data_state", data, (layout["dp"],), (dp,), replica_id=pp * layout["tp"] + tp),
    }


def start_write_results_queue() -> None:
    """megatron-core's filesystem writer collects write results through a multiprocessing Manager that it
    starts with the spawn method: a fresh interpreter that re-imports torch and megatron (about 6 s), and
    that hangs forever when the launching script lacks an `if __name__ == "__main__":` guard. A Manager
    forked from this process serves the same queue without either problem (the forked child runs only the
    Manager's pure-Python server loop)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def save_checkpoint(root: str | Path, iteration: int, model, optimizer, scheduler, loader, config: dict,
                    keep_last: int = 3) -> Path:
    """Save atomically; returns the checkpoint folder. `model` is the unwrapped Megatron module."""
    start_write_results_queue()
    root = Path(root)
    final, tmp = checkpoint_dir(root, iteration), checkpoint_dir(root, iteration).with_suffix(".tmp")
    if torch.distributed.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    model_state = model.sharded_state_dict()
    state = {
        "model": model_state,
        "optimizer": optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_METADATA),
        **_per_rank_objects(_rng_state(), loader.state_dict()),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "layout": _layout(),
        "distributed_optimizer": _is_distributed(optimizer),
        "vocab_size": model.tokenizer_vocab_size,
        "config": config,
    }
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = root / (MARKER + ".tmp")
        marker_tmp.write_text(str(iteration))
        os.replace(marker_tmp, root / MARKER)
        kept = sorted(p for p in root.glob("iter_???????") if p.is_dir())
        for old in kept[: max(0, len(kept) - keep_last)]:
            shutil.rmtree(old)
    torch.distributed.barrier()
    return final


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _is_distributed(optimizer) -> bool:
    return bool(_distributed_optimizers(optimizer))


def _allocate_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.state_dict(), which its load template calls, reads the `step`
    of torch Adam's per-parameter state; a torch optimizer (no TE / apex fused Adam) has none before its first
    step. Take the zero-gradient step megatron-core takes itself before Megatron-FSDP loads; the load then
    overwrites the state and the main weights it touched."""
    for opt in _distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """The distributed optimizer saves torch Adam's step in its param groups, but megatron-core 0.16.1's load
    gives every parameter the same step tensor (which torch's Adam then increments once per parameter) and its
    dp_reshardable load copies the step from before the load into it: give each parameter its own step,
    the saved one."""
    chained, distributed = getattr(optimizer, "chained_optimizers", [optimizer]), _distributed_optimizers(optimizer)
    states = [loaded] if len(chained) == 1 else [loaded[i] for i in range(len(chained))]
    for opt, state in zip(chained, states):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g} if opt in distributed else ()
        if len(steps) != 1:  # not a distributed optimizer, or nothing trained yet
            continue
        step = steps.pop()
        for param_state in opt.optimizer.state.values():
            if "step" in param_state:  # torch Adam's; fused Adams (TE, apex) keep none per parameter
                param_state["step"] = param_state["step"].new_full((), step)


def _load(template: dict, path: Path) -> dict:
    """dist_checkpointing.load, where the only keys asked for and absent from the checkpoint may be TE's
    `_extra_state` (FP8 metadata, rebuilt by TE): a local-spec checkpoint then loads into the TE spec."""
    loaded, _, unexpected = dist_checkpointing.load(template, str(path), strict=StrictHandling.RETURN_ALL)
    absent = sorted(k for k in unexpected if not k.endswith("._extra_state"))
    if absent:
        raise ValueError(f"{path} lacks {absent[:5]}{' ...' if len(absent) > 5 else ''} (a different model config?): "
                         "check model.config and model.overrides against the checkpoint's")
    return loaded


def _set_weights(model, weights: dict) -> None:
    missing = [k for k in model.load_state_dict(weights, strict=False).missing_keys if not k.endswith("._extra_state")]
    if missing:
        raise RuntimeError(f"the checkpoint did not provide {missing[:5]}: the model and its sharded_state_dict disagree")


def load_model_weights(path: str | Path, model) -> None:
    """The model's weights from one checkpoint folder, at any TP / PP layout and with either layer spec."""
    _set_weights(model, _load({"model": model.sharded_state_dict()}, Path(path))["model"])


def load_checkpoint(root: str | Path, model, optimizer=None, scheduler=None, loader=None,
                    expected_vocab_size: int | None = None) -> int:
    """Load the latest checkpoint of `root`: the model always; with `optimizer`, also the optimizer, scheduler,
    RNG and data position (TP and PP must match the saved layout; DP may differ, see the module docstring).
    Returns the checkpoint's iteration."""
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no checkpoint in {root} (no {MARKER}): check --load, or train without it")
    path = checkpoint_dir(root, iteration)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if expected_vocab_size is not None and common["vocab_size"] != expected_vocab_size:
        raise ValueError(
            f"{path} was trained with a tokenizer of {common['vocab_size']} tokens, the data has "
            f"{expected_vocab_size}: preprocess the data with the checkpoint's tokenizer"
        )
    if optimizer is None:
        load_model_weights(path, model)
        return iteration
    saved, layout = common["layout"], _layout()
    if (saved["tp"], saved["pp"]) != (layout["tp"], layout["pp"]):
        raise RuntimeError(
            f"{path} was saved with layout {saved}, this run is {layout}: the optimizer state resumes at another "
            "DP size but not at other TP / PP sizes; use finetune (weights only) to change them"
        )
    if common.get("distributed_optimizer", False) != _is_distributed(optimizer):
        raise RuntimeError(
            f"{path} was saved {'with' if common.get('distributed_optimizer') else 'without'} the distributed "
            "optimizer: resume with the same optimizer.use_distributed_optimizer, or use finetune (weights only)"
        )
    same_dp = saved["dp"] == layout["dp"]
    _allocate_optimizer_state(optimizer)
    model_state = model.sharded_state_dict()
    template = {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)}
    if same_dp:
        template.update(_per_rank_objects(_rng_state(), loader.state_dict()))  # placeholders of the right type
    loaded = _load(template, path)
    _set_weights(model, loaded["model"])
    with torch.no_grad():  # the distributed optimizer copies into fp32 main shards that view the parameters
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_dp:
        _set_rng_state(loaded["rng_state"])
        loader.load_state_dict(loaded["data_state"])
    elif torch.distributed.get_rank() == 0:
        print(f"resuming {path} (data parallel {saved['dp']}) at data parallel {layout['dp']}: model, optimizer and "
              "scheduler resume; the data order and RNG streams, kept per DP rank, restart from the config's seeds",
              flush=True)
    return iteration
