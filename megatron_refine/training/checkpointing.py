"""Checkpoints: megatron-core dist_checkpointing, written atomically, with everything a resume needs.

Layout of a save folder:
    iter_0000100/                 a complete checkpoint (model, optimizer, scheduler, RNG, data position, config)
    latest_checkpointed_iteration.txt
A checkpoint is written to `iter_NNNNNNN.tmp` and renamed into place once every rank has finished; the
`latest` marker is replaced (atomically) only after that, and only then are old checkpoints pruned. A crash
mid-write leaves a `.tmp` folder that loading ignores (and the next save clears), never a half checkpoint.
Model weights load at any TP / PP / DP layout; the optimizer, RNG and data position need the saved layout.
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

MARKER = "latest_checkpointed_iteration.txt"


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
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
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
        "optimizer": optimizer.sharded_state_dict(model_state),
        **_per_rank_objects(_rng_state(), loader.state_dict()),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "layout": _layout(),
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


def load_checkpoint(root: str | Path, model, optimizer=None, scheduler=None, loader=None,
                    expected_vocab_size: int | None = None) -> int:
    """Load the latest checkpoint of `root`: the model always; optimizer, scheduler, RNG and data position
    when given (the parallel layout must then match). Returns the checkpoint's iteration."""
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
    full_resume = optimizer is not None and common["layout"] == _layout()
    if optimizer is not None and not full_resume:
        raise RuntimeError(
            f"{path} was saved with layout {common['layout']}, this run is {_layout()}: the optimizer, RNG "
            "and data position only resume on the same layout; use finetune (weights only) to change it"
        )
    model_state = model.sharded_state_dict()
    template = {"model": model_state}
    if full_resume:
        template["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=True)
        template.update(_per_rank_objects(_rng_state(), loader.state_dict()))  # placeholders of the right type
    loaded = dist_checkpointing.load(template, str(path))
    model.load_state_dict(loaded["model"])
    if full_resume:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        _set_rng_state(loaded["rng_state"])
        loader.load_state_dict(loaded["data_state"])
    return iteration
