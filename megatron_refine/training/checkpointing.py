"""Checkpoints: megatron-core dist_checkpointing, written atomically, with everything a resume needs. The folder
layout, marker and checksums below are `checkpoint_format.py`'s, which this module and the converters call.

Layout of a save folder:
    iter_0000100/                 a complete checkpoint (model, optimizer, scheduler, RNG, data position, config)
        checksums.sha256          the sha256 of each of its files (`sha256sum -c checksums.sha256` reads it)
    latest_checkpointed_iteration.txt
    checkpoint.lock               locked by the run that saves here, which writes its pid, host and start time in it
A checkpoint is written to `iter_NNNNNNN.tmp` and renamed into place once every rank has finished; the
`latest` marker is replaced (atomically) only after that, and only then are old checkpoints pruned: the
`keep_last` highest complete iterations up to the one just written stay, and those above it (left by a run this
one overwrote) go. A crash mid-write leaves a `.tmp` folder that loading ignores (and the next save clears),
never a half checkpoint; a folder whose marker is gone resumes from its newest complete checkpoint.

Loading verifies before it trusts: every file the checkpoint's index names must be there and long enough and
match its recorded sha256 (checkpoints from before checksums: sizes only), the weights must be finite, and the
model (mixer and shapes) and the tokenizer of the data must be the checkpoint's.
A checkpoint that fails the first two is skipped for the newest older one that loads (said on the console); a
model or tokenizer mismatch is an error naming both sides.
Model weights load at any TP / PP / DP layout. The optimizer state resumes at another DP size too (the
distributed optimizer saves megatron-core's `dp_reshardable` format); it needs the saved TP / PP sizes. RNG and
data position are per DP rank: they resume exactly on the saved layout and restart from the seeds otherwise; the
data position restarts too on data other than the checkpoint's (another path, or other content at the same path).
Weights saved with the local spec load into the Transformer-Engine spec and back (TE's `_extra_state`, its FP8
metadata, is skipped where the checkpoint lacks it).
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_refine.megatron_compat import COMMON_STATE_FILE, write_common_state_file
from megatron_refine.models.mixers import get_mixer
from megatron_refine.runtime import current_device
from megatron_refine.training.checkpoint_format import (
    MARKER, CheckpointError, abandon_write, begin_write, checkpoint_dir, latest_iteration, prune, publish,
    saved_iterations, staging_dir, verify_files, write_checksums)

LOCK = "checkpoint.lock"
# The distributed optimizer's format: one ShardedTensor per contiguous buffer shard, fully parallel save and
# load with no gather, reshardable across DP sizes (megatron-core's default, fully_sharded_model_space, builds
# flattened_range ShardedTensors that dist_checkpointing 0.16 refuses). Plain optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


# save folder -> (pid, its lock file's descriptor) while that process holds the lock (a forked child inherits the
# dict, not the lock)
_held_locks: dict[Path, tuple[int, int]] = {}


def lock_save_folder(root: str | Path) -> None:
    """Collective: rank 0 takes an exclusive lock on `root`/LOCK for the run's life and writes pid, host and start
    time into it for the next run's message; this also proves at start that `root` is writable. A POSIX record
    lock (fcntl), not flock: it belongs to this process alone (the processes it forks, such as the checkpoint
    writers, do not inherit it), the kernel releases it when the process dies, so a killed run leaves no stale
    lock, and NFS supports it. Re-entrant within one process."""
    root = Path(root).resolve()
    failure = None
    if torch.distributed.get_rank() == 0 and _held_locks.get(root, (None,))[0] != os.getpid():
        failure = _lock(root)
    failure = _agree(failure)
    if failure:
        raise CheckpointError(failure)


def _lock(root: Path) -> str | None:
    import fcntl
    import tempfile

    lock = root / LOCK
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return _not_writable(root, e)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)  # a file system without locks (ENOLCK, ENOSYS: Lustre mounted noflock): run, as before
            print(f"checkpoint.save {root} cannot be locked ({e.strerror}): nothing stops a second run saving there",
                  flush=True)
            return None
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        return (f"checkpoint.save {root} is in use by another run ({holder}; lock {lock}): wait for it to end, or "
                "pick another checkpoint.save")
    try:
        os.rmdir(tempfile.mkdtemp(dir=root, prefix=".write-test"))  # the lock file may predate a read-only folder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
    except OSError as e:
        os.close(fd)
        return _not_writable(root, e)
    _held_locks[root] = (os.getpid(), fd)
    return None


def _not_writable(root: Path, error: OSError) -> str:
    return f"checkpoint.save {root} is not writable ({error.strerror}): pick another checkpoint.save, or fix its permissions"


def save_folder_holder(root: str | Path) -> str | None:
    """Who holds `root`'s lock (a live run saving there, as its lock file says), or None: for the tools that would
    replace such a folder (`convert-from-hf --overwrite`). Not collective; takes and drops the lock at once."""
    import fcntl

    lock = Path(root) / LOCK
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None  # no lock file (or none we could lock: then no run could hold it either)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            return None
        return os.pread(fd, 512, 0).decode(errors="replace").strip() or "a run that has not written its name yet"
    finally:
        os.close(fd)  # closing drops a lock this process took


def unlock_save_folder(root: str | Path) -> None:
    """Release what `lock_save_folder` took (at a run's end; a process that dies releases it anyway)."""
    pid, fd = _held_locks.pop(Path(root).resolve(), (None, None))
    if pid == os.getpid():
        os.close(fd)


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


def model_identity(model) -> dict:
    """What a checkpoint's weights must match: the mixer (a hybrid's layer pattern) and the shapes (any parallel
    layout)."""
    c = model.config
    return {"mixer": c.architecture, "num_layers": c.num_layers, "hidden_size": c.hidden_size,
            "num_attention_heads": c.num_attention_heads, "ffn_hidden_size": c.ffn_hidden_size,
            "vocab_size": model.tokenizer_vocab_size}


def parameter_names(model) -> list[str]:
    """The model's parameters in order: the distributed optimizer's saved state (`dp_reshardable`) follows the
    gradient buffers' order, which this fixes."""
    return [name for name, _ in model.named_parameters()]


def _check_parameter_order(path: Path, common: dict, model) -> None:
    """The distributed optimizer's state resumes only onto the parameters it was saved from, in the same order.
    Checkpoints before this record: LaCT's then had four input projections where it now has one (`in_proj`)."""
    saved = common.get("parameter_names")
    reordered = any(get_mixer(m).parameter_order_changed for m in model.config.mixers)
    if saved == parameter_names(model) or (saved is None and not reordered):
        return
    why = ("was saved before LaCT's input projections were fused" if saved is None
           else "holds the optimizer state of other parameters (or another order)")
    raise ValueError(f"{path} {why}: its distributed-optimizer state does not resume onto this model; load the "
                     "weights only with checkpoint.finetune=true (the optimizer starts afresh)")


def _describe(identity: dict) -> str:
    return (f"{identity['mixer']} ({identity['num_layers']} layers, hidden {identity['hidden_size']}, "
            f"{identity['num_attention_heads']} heads, MLP {identity['ffn_hidden_size']}, vocab {identity['vocab_size']})")


def save_checkpoint(root: str | Path, iteration: int, model, optimizer, scheduler, loader, config: dict,
                    keep_last: int = 3) -> Path:
    """Save atomically; returns the checkpoint folder. `model` is the unwrapped Megatron module."""
    if keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1 (the checkpoint just written is always kept), got {keep_last}")
    start_write_results_queue()
    root = Path(root)
    final, tmp = checkpoint_dir(root, iteration), staging_dir(root, iteration)
    if torch.distributed.get_rank() == 0:
        begin_write(root, iteration)
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
        "parameter_names": parameter_names(model),
        "vocab_size": model.tokenizer_vocab_size,
        "model_identity": model_identity(model),
        "tokenizer_hash": loader.dataset.tokenizer_hash,
        "tokenizer": loader.dataset.tokenizer_description,
        "data_path": str(Path(loader.dataset.path).resolve()),
        "data_identity": loader.dataset.content_hash,  # the same path may be re-preprocessed into other data
        "config": config,
    }
    main = torch.distributed.get_rank() == 0
    try:
        dist_checkpointing.save(state, str(tmp))
        torch.distributed.barrier()
        if main:
            write_common_state_file(tmp, state)
        write_checksums(tmp)
        if main:
            publish(root, iteration)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        if main:
            abandon_write(root, iteration)
        if _no_space(e) or (_writer_os_error(e) and _disk_full(root)):
            raise CheckpointError(
                f"saving {final.name} into {root} failed: no space left on device (ENOSPC; "
                f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free there): the older checkpoints and {MARKER} are "
                "as they were; free some space (or lower checkpoint.keep_last), then resume") from e
        raise
    if main:
        prune(root, iteration, keep_last)
    torch.distributed.barrier()
    return final


def _writer_os_error(error: BaseException) -> bool:
    """megatron-core >= 0.17's writer reports an OSError of its own as an assertion on its type ("<class
    'OSError'>"): the errno is gone, so `_disk_full` asks the disk."""
    return "<class 'OSError'>" in str(error)


def _disk_full(root: Path) -> bool:
    """Whether writing 1 MiB into `root` fails for want of space (ENOSPC / EDQUOT)."""
    probe = root / f".space-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        probe.unlink(missing_ok=True)
    return False


def _no_space(error: BaseException) -> bool:
    """Whether a failed save ran out of disk space: ENOSPC (or EDQUOT) anywhere in the exception chain, including
    the ranks' failures torch's CheckpointException carries, or in their text (megatron-core's writer processes
    send theirs back as text; torch's zip writer reports a short write as 'unexpected pos')."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        stack += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            stack += [failure[0] for failure in e.failures.values()]
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "Disk quota exceeded", "unexpected pos"))


def saved_tokenizer(root: str | Path):
    """The tokenizer the newest checkpoint of `root` was trained with (as it records it, or as its training data's
    metadata.json does for checkpoints from before it did), or None when neither says."""
    import json

    from megatron_refine.data.tokenizers import tokenizer_from_metadata

    iteration = latest_iteration(root)
    if iteration is None:
        return None
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, iteration)))
    if common.get("tokenizer"):
        return tokenizer_from_metadata(common["tokenizer"])
    metadata = Path(common.get("data_path") or "") / "metadata.json"
    if common.get("data_path") and metadata.is_file():
        return tokenizer_from_metadata(json.loads(metadata.read_text())["tokenizer"])
    return None


def tokenizer_or_saved(spec: str | None, root: str | Path | None):
    """`spec` ("byte" or a tokenizer.json) when given, else the tokenizer checkpoint folder `root` was trained with;
    None when neither says."""
    from megatron_refine.data.tokenizers import load_tokenizer

    if spec:
        return load_tokenizer(spec)
    return saved_tokenizer(root) if root else None


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


# The param-group fields an OptimizerParamScheduler sets from the config (the rest name what a group is).
_SCHEDULE_FIELDS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _match_param_groups(state, optimizer) -> None:
    """Give the saved param groups the optimizer's schedule fields. megatron-core >= 0.17 matches saved groups to
    the optimizer's by a key that includes max_lr / min_lr / wd, so a resume with another optimizer.lr would find
    no group; the values a resumed run uses come from its scheduler after the load (`trainer.resume_schedule`)."""
    def identity(group: dict) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in group.items() if k not in _SCHEDULE_FIELDS + ("params", "lr",
                                                                                                   "weight_decay")))
    current = {identity(g): {k: g[k] for k in _SCHEDULE_FIELDS if k in g} for g in optimizer.param_groups}
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
                for group in groups:
                    group.update(current.get(identity(group), {}))
            stack.extend(v for k, v in node.items() if k != "param_groups")
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _agree(failure: str | None) -> str | None:
    """Every rank takes the same decision: a failure seen by any rank (this rank's message, else the first
    rank's that saw one, so rank 0 can name a file only another rank checked)."""
    failures = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failures, failure)
    return failure or next((f for f in failures if f), None)


def _load(template: dict, path: Path) -> dict:
    """dist_checkpointing.load, where the only keys asked for and absent from the checkpoint may be TE's
    `_extra_state` (FP8 metadata, rebuilt by TE): a local-spec checkpoint then loads into the TE spec."""
    try:
        loaded, _, unexpected = dist_checkpointing.load(template, str(path), strict=StrictHandling.RETURN_ALL)
    except Exception as e:  # noqa: BLE001 - a file that cannot be read or decoded: the checkpoint is unusable
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {first})") from e
    absent = sorted(k for k in unexpected if not k.endswith("._extra_state"))
    if absent:
        raise ValueError(f"{path} lacks {absent[:5]}{' ...' if len(absent) > 5 else ''} (a different model config?): "
                         "check model.config and model.overrides against the checkpoint's")
    return loaded


def _set_weights(model, weights: dict, path: Path) -> None:
    missing = [k for k in model.load_state_dict(weights, strict=False).missing_keys if not k.endswith("._extra_state")]
    if missing:
        raise RuntimeError(f"the checkpoint did not provide {missing[:5]}: the model and its sharded_state_dict disagree")
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if _agree(f"{path} holds non-finite weights ({', '.join(nonfinite[:3])})" if nonfinite else None):
        raise CheckpointError(f"{path} holds non-finite weights (NaN/Inf{': ' + ', '.join(nonfinite[:3]) if nonfinite else ''})")


def load_model_weights(path: str | Path, model) -> None:
    """The model's weights from one checkpoint folder, at any TP / PP layout and with either layer spec."""
    _set_weights(model, _load({"model": model.sharded_state_dict()}, Path(path))["model"], Path(path))


def _check_identity(path: Path, common: dict, model, dataset, allow_tokenizer_change: bool) -> None:
    """Errors no older checkpoint of the folder would fix: data of another tokenizer, or another model."""
    if dataset is not None:
        _check_tokenizer(path, common, dataset, allow_tokenizer_change)
    saved = common.get("model_identity")
    if saved is not None and saved != model_identity(model):
        raise ValueError(f"{path} holds a {_describe(saved)} model; the config asks for {_describe(model_identity(model))}: "
                         "load it with its own model config (model.config / model.overrides)")


def _check_tokenizer(path: Path, common: dict, dataset, allow_tokenizer_change: bool) -> None:
    if common["vocab_size"] != dataset.vocab_size:
        raise ValueError(
            f"{path} was trained with a tokenizer of {common['vocab_size']} tokens, the data has "
            f"{dataset.vocab_size}: preprocess the data with the checkpoint's tokenizer"
        )
    saved_hash, data_hash = common.get("tokenizer_hash"), dataset.tokenizer_hash
    if saved_hash and data_hash and saved_hash != data_hash and not allow_tokenizer_change:
        raise ValueError(
            f"{path} was trained on data of another tokenizer (hash {saved_hash[:12]}) than {dataset.path} "
            f"({data_hash[:12]}), of the same vocabulary size: preprocess the data with the checkpoint's tokenizer, "
            "or set checkpoint.allow_tokenizer_change=true if the change is deliberate"
        )


def load_checkpoint(root: str | Path, model, optimizer=None, scheduler=None, loader=None, *, dataset=None,
                    allow_tokenizer_change: bool = False) -> int:
    """Load the newest usable checkpoint of `root`: the model always; with `optimizer`, also the optimizer,
    scheduler, RNG and data position (TP and PP must match the saved layout; DP may differ, see the module
    docstring). `dataset` (default: the loader's) is checked against the checkpoint's tokenizer. A checkpoint
    with a missing or unreadable file, or non-finite weights, is skipped for the newest older one, said on the
    console; so is a missing marker (the newest complete checkpoint is used). Returns the loaded checkpoint's
    iteration."""
    marker = latest_iteration(root)
    if marker is None:
        raise FileNotFoundError(f"no checkpoint in {root} (no {MARKER}, no complete iter_* folder): check --load, "
                                "or train without it")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not (Path(root) / MARKER).is_file() and rank == 0:
        print(f"{root} has no {MARKER}: loading its newest complete checkpoint, {checkpoint_dir(root, marker).name}",
              flush=True)
    dataset = dataset if dataset is not None or loader is None else loader.dataset
    candidates = [i for i in reversed(saved_iterations(root)) if i <= marker]
    for n, iteration in enumerate(candidates):
        path = checkpoint_dir(root, iteration)
        try:
            failure = None
            try:
                verify_files(path, rank=rank, world=world)  # the ranks share the hashing
            except CheckpointError as e:
                failure = str(e)
            failure = _agree(failure)
            if failure:
                raise CheckpointError(failure)
            _load_one(path, model, optimizer, scheduler, loader, dataset, allow_tokenizer_change)
            return iteration
        except CheckpointError as e:
            older = candidates[n + 1] if n + 1 < len(candidates) else None
            if older is None:
                raise CheckpointError(f"{e}; no older checkpoint in {root} to fall back to") from None
            if torch.distributed.get_rank() == 0:
                print(f"checkpoint {path.name} is unusable: {e}; falling back to {checkpoint_dir(root, older).name}",
                      flush=True)
    raise FileNotFoundError(f"no complete checkpoint in {root}")


def _load_one(path: Path, model, optimizer, scheduler, loader, dataset, allow_tokenizer_change: bool) -> None:
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - unreadable common state
        where = path / COMMON_STATE_FILE if (path / COMMON_STATE_FILE).is_file() else f"{path}'s common state"
        raise CheckpointError(f"{where} is unreadable ({type(e).__name__})") from None
    _check_identity(path, common, model, dataset, allow_tokenizer_change)
    if optimizer is None:
        load_model_weights(path, model)
        return
    saved, layout = common["layout"], _layout()
    if (saved["tp"], saved["pp"]) != (layout["tp"], layout["pp"]):
        raise ValueError(
            f"{path} was saved with layout {saved}, this run is {layout}: the optimizer state resumes at another "
            "DP size but not at other TP / PP sizes; use finetune (weights only) to change them"
        )
    if common.get("distributed_optimizer", False) != _is_distributed(optimizer):
        raise ValueError(
            f"{path} was saved {'with' if common.get('distributed_optimizer') else 'without'} the distributed "
            "optimizer: resume with the same optimizer.use_distributed_optimizer, or use finetune (weights only)"
        )
    if _is_distributed(optimizer):
        _check_parameter_order(path, common, model)
    same_dp = saved["dp"] == layout["dp"]
    same_path = common.get("data_path") in (None, str(Path(loader.dataset.path).resolve()))
    same_content = common.get("data_identity") in (None, loader.dataset.content_hash)
    same_data = same_path and same_content
    _allocate_optimizer_state(optimizer)
    model_state = model.sharded_state_dict()
    template = {"model": model_state,
                "optimizer": optimizer.sharded_state_dict(model_state, is_loading=True, metadata=OPTIMIZER_METADATA)}
    if same_dp:
        template.update(_per_rank_objects(_rng_state(), loader.state_dict()))  # placeholders of the right type
    loaded = _load(template, path)
    _set_weights(model, loaded["model"], path)
    with torch.no_grad():  # the distributed optimizer copies into fp32 main shards that view the parameters
        _match_param_groups(loaded["optimizer"], optimizer)
        optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if same_dp:
        _set_rng_state(loaded["rng_state"])
        if same_data:
            loader.load_state_dict(loaded["data_state"])
    main = torch.distributed.get_rank() == 0
    if not same_dp and main:
        print(f"resuming {path} (data parallel {saved['dp']}) at data parallel {layout['dp']}: model, optimizer and "
              "scheduler resume; the data order and RNG streams, kept per DP rank, restart from the config's seeds",
              flush=True)
    elif not same_path and main:
        print(f"resuming {path}, trained on {common['data_path']}, on {loader.dataset.path}: the data position is reset "
              "to the start of the new data", flush=True)
    elif not same_content and main:
        print(f"resuming {path}: {loader.dataset.path} holds other data than it was trained on (re-preprocessed since): "
              "the data position is reset to the start of the new data", flush=True)
