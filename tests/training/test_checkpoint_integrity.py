"""Nothing lost, nothing silently wrong: checksummed checkpoints, pruning by iteration, a folder without its marker,
re-preprocessed data, the save folder's lock, a full disk and a read-only folder."""

import contextlib
import errno
import io
import os
import shutil
import struct

import pytest
from test_restarts import _config

from megatron_refine.runtime import RankFailed, spawn
from megatron_refine.training import save_checkpoint, setup, train
from megatron_refine.training.checkpoint_format import CHECKSUMS, MARKER, checkpoint_dir, latest_iteration, saved_iterations
from megatron_refine.training.checkpointing import LOCK, _lock, unlock_save_folder

def _train(corpus, *extra):
    return len(train(_config(corpus, *extra)).losses)


def _resume(corpus, root, *extra):
    """(start step, the first embedding weight, the loader's position, the console) of a run resuming `root`."""
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        trainer = setup(_config(corpus, f"checkpoint.load={root}", "train_steps=16", *extra))
    weight = trainer.module.embedding.word_embeddings.weight.view(-1)[0].item()
    return trainer.start_step, weight, trainer.loader.state_dict(), console.getvalue()


def test_a_changed_float_fails_its_checksum_and_the_newest_good_checkpoint_loads(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=4", "checkpoint.save_interval=2", f"checkpoint.save={tmp_path}")
    step, weight, _, _ = spawn(_resume, 1, corpus, tmp_path)[0]
    assert step == 4
    # One float of iter 4's weights set to 123.0, the file's size unchanged (the fp32 bytes of that weight).
    old, new = struct.pack("<f", weight), struct.pack("<f", 123.0)
    file = next(f for f in sorted(checkpoint_dir(tmp_path, 4).glob("*.distcp")) if old in f.read_bytes())
    file.write_bytes(file.read_bytes().replace(old, new, 1))
    step, weight, _, console = spawn(_resume, 1, corpus, tmp_path)[0]
    assert (step, weight != 123.0) == (2, True)
    assert f"checkpoint iter_0000004 is unusable: {file} is corrupt: its sha256 differs" in console
    assert "falling back to iter_0000002" in console
    # A checkpoint from before checksums is checked by size only: the change would load unseen.
    (checkpoint_dir(tmp_path, 4) / CHECKSUMS).unlink()
    assert spawn(_resume, 1, corpus, tmp_path)[0][:2] == (4, 123.0)


def test_pruning_keeps_the_highest_iterations_whatever_the_file_times(corpus, tmp_path):
    base, copy = tmp_path / "base", tmp_path / "copy"
    spawn(_train, 1, corpus, "train_steps=6", "checkpoint.save_interval=2", f"checkpoint.save={base}")
    shutil.copytree(base, copy)
    for age, iteration in enumerate([2, 4, 6]):  # as `cp -r` may leave them: iter 6 the oldest
        os.utime(checkpoint_dir(copy, iteration), ns=(10**18 - age * 10**9,) * 2)
    spawn(_train, 1, corpus, "train_steps=8", "checkpoint.save_interval=2", f"checkpoint.save={copy}",
          f"checkpoint.load={copy}")
    assert saved_iterations(copy) == [4, 6, 8]


def test_a_folder_without_its_marker_resumes_from_its_newest_complete_checkpoint(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=6", "checkpoint.save_interval=2", f"checkpoint.save={tmp_path}")
    (tmp_path / MARKER).unlink()
    next(checkpoint_dir(tmp_path, 6).glob("*.distcp")).unlink()  # incomplete: the newest complete one is iter 4
    with pytest.raises(RankFailed, match=rf"checkpoint.save {tmp_path} holds checkpoints up to iter 4: resume with"):
        spawn(_train, 1, corpus, "train_steps=2", f"checkpoint.save={tmp_path}")
    step, _, _, console = spawn(_resume, 1, corpus, tmp_path, f"checkpoint.save={tmp_path}")[0]
    assert step == 4 and f"{tmp_path} has no {MARKER}: loading its newest complete checkpoint, iter_0000004" in console
    assert saved_iterations(tmp_path) == [2, 4, 6]  # nothing pruned or overwritten on the way


def test_resume_on_data_re_preprocessed_at_the_same_path_restarts_the_data_position(corpus, tmp_path):
    from megatron_refine.data import write_builtin_corpus

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    spawn(_train, 1, str(data), "train_steps=3", f"checkpoint.save={tmp_path / 'ck'}")
    step, _, position, console = spawn(_resume, 1, str(data), tmp_path / "ck")[0]
    assert step == 3 and position["document"] > 0 and "data position is reset" not in console
    write_builtin_corpus(data, 200, seed=1, shard_size=25, overwrite=True, progress=False)  # same path and names
    step, _, position, console = spawn(_resume, 1, str(data), tmp_path / "ck")[0]
    assert step == 3 and position["epoch"] == position["shard"] == position["document"] == 0
    assert f"{data} holds other data than it was trained on (re-preprocessed since): the data position is reset" in console


def _holds_lock_then_dies(root):
    _lock(root)
    os.kill(os.getpid(), 9)


def test_a_second_run_into_a_save_folder_in_use_is_refused_naming_the_holder(corpus, tmp_path):
    import multiprocessing as mp

    assert _lock(tmp_path) is None  # this process holds it, as a running job's rank 0 would
    try:
        with pytest.raises(RankFailed, match=rf"checkpoint.save {tmp_path} is in use by another run \(pid {os.getpid()} "
                                             rf"on \S+ since [-0-9]+ [:0-9]+; lock {tmp_path / LOCK}\)"):
            spawn(_train, 1, corpus, "train_steps=1", f"checkpoint.save={tmp_path}")
    finally:
        unlock_save_folder(tmp_path)
    holder = mp.get_context("fork").Process(target=_holds_lock_then_dies, args=(tmp_path,))
    holder.start()
    holder.join()
    assert holder.exitcode == -9 and f"pid {holder.pid} " in (tmp_path / LOCK).read_text()
    assert spawn(_train, 1, corpus, "train_steps=1", f"checkpoint.save={tmp_path}") == [1]  # a dead holder's lock is gone


class _FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left for it."""
    room = 200

    def write(self, data):
        if len(memoryview(data)) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(memoryview(data))
        return super().write(data)


def _save_on_a_full_disk(corpus, root):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    trainer = setup(_config(corpus))
    state = trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {}
    save_checkpoint(root, 1, *state)
    from megatron_refine.training import checkpointing

    # the writer processes' files (forked: they see this), and ours: megatron-core >= 0.17 drops the writer's errno,
    # so a failed save asks the disk itself whether it is full
    filesystem_async.open = checkpointing.open = _FullDisk
    try:
        save_checkpoint(root, 2, *state)
    finally:
        del filesystem_async.open, checkpointing.open


def test_a_full_disk_names_enospc_and_keeps_the_older_checkpoints(corpus, tmp_path):
    with pytest.raises(RankFailed, match=rf"saving iter_0000002 into {tmp_path} failed: no space left on device "
                                         rf"\(ENOSPC; [0-9.]+ GiB free there\): the older checkpoints and {MARKER}"):
        spawn(_save_on_a_full_disk, 1, corpus, tmp_path)
    assert latest_iteration(tmp_path) == 1 and sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001"]


@pytest.mark.parametrize("unwritable", ["under_a_file", "read_only"])
def test_an_unwritable_save_folder_is_refused_before_the_first_step(corpus, tmp_path, unwritable):
    if unwritable == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        root = tmp_path / "ro"
        root.mkdir()
        (root / LOCK).touch()  # a lock file left by an earlier run stays writable in a folder made read-only
        root.chmod(0o555)
    else:
        (tmp_path / "file").touch()
        root = tmp_path / "file" / "ck"
    try:
        with pytest.raises(RankFailed, match=rf"checkpoint.save {root} is not writable \(.*\): pick another"):
            spawn(_train, 1, corpus, "train_steps=1", f"checkpoint.save={root}")
    finally:
        if unwritable == "read_only":
            root.chmod(0o755)
