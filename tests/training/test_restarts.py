"""No lost work: pruning keeps what was just written, one command starts and resumes, corrupt checkpoints are
skipped for older ones, diverged runs stop before saving, and a checkpoint only loads into its own model."""

import pytest
import torch

from megatron_refine.runtime import RankFailed, spawn
from megatron_refine.training import load_config, save_checkpoint, setup, train
from megatron_refine.training.checkpoint_format import checkpoint_dir, latest_iteration, saved_iterations

SEQ = 32


def _config(corpus, *extra):
    return load_config("tiny-deltanet", [
        f"data.path={corpus}", f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=0", "logging.log_interval=100", "device=cpu", *extra,
    ])


def _train(corpus, *extra):
    return train(_config(corpus, *extra)).losses


def test_an_overwriting_run_replaces_the_checkpoints_above_its_own(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=20", "checkpoint.save_interval=5", f"checkpoint.save={tmp_path}")
    assert saved_iterations(tmp_path) == [10, 15, 20]  # keep_last 3
    spawn(_train, 1, corpus, "train_steps=5", f"checkpoint.save={tmp_path}", "checkpoint.overwrite=true",
          "checkpoint.keep_last=2")
    # 10, 15 and 20 are the overwritten run's: a resume (even without the marker) must not take them for its own
    assert latest_iteration(tmp_path) == 5 and saved_iterations(tmp_path) == [5]


def test_keep_last_zero_is_refused(corpus, tmp_path):
    with pytest.raises(Exception, match="keep_last must be >= 1"):
        spawn(_train, 1, corpus, "train_steps=1", f"checkpoint.save={tmp_path}", "checkpoint.keep_last=0")


def test_one_command_starts_then_resumes_and_a_used_save_folder_is_not_overwritten(corpus, tmp_path):
    same = [f"checkpoint.save={tmp_path}", f"checkpoint.load={tmp_path}", "train_steps=4"]
    first = spawn(_train, 1, corpus, *same, "exit_interval=2")[0]  # no checkpoint yet: starts fresh
    second = spawn(_train, 1, corpus, *same)[0]  # the requeued job: resumes at step 2
    assert (len(first), len(second), latest_iteration(tmp_path)) == (2, 2, 4)
    with pytest.raises(RankFailed, match=rf"{tmp_path} holds checkpoints up to iter 4: resume with --load"):
        spawn(_train, 1, corpus, "train_steps=2", f"checkpoint.save={tmp_path}")
    assert latest_iteration(tmp_path) == 4


def _resumed_from(corpus, root):
    return setup(_config(corpus, f"checkpoint.load={root}", "train_steps=8")).start_step


def _poison(corpus, root):
    """Save iter 6 with a NaN weight, as a diverged run without the max_skipped_steps guard would."""
    trainer = setup(_config(corpus, f"checkpoint.load={root}", "train_steps=8"))
    with torch.no_grad():
        next(trainer.module.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(root, 6, trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {})


def test_a_corrupt_checkpoint_is_skipped_for_the_newest_older_one(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=4", "checkpoint.save_interval=2", f"checkpoint.save={tmp_path}")
    spawn(_poison, 1, corpus, tmp_path)
    assert latest_iteration(tmp_path) == 6
    assert spawn(_resumed_from, 1, corpus, tmp_path) == [4]  # iter 6 holds NaN weights
    next(checkpoint_dir(tmp_path, 4).glob("*.distcp")).unlink()
    assert spawn(_resumed_from, 1, corpus, tmp_path) == [2]  # iter 4 lost a file
    (checkpoint_dir(tmp_path, 2) / "common.pt").write_bytes(b"garbage")
    with pytest.raises(RankFailed, match=r"common.pt is corrupt: its sha256 differs.*no older checkpoint"):
        spawn(_resumed_from, 1, corpus, tmp_path)


def _diverging(corpus, root):
    from megatron_modules import nan_losses

    with nan_losses():
        train(_config(corpus, "train_steps=6", "exit_interval=4", f"checkpoint.save={root}",
                      "checkpoint.overwrite=true", "checkpoint.keep_last=1", "max_skipped_steps=3"))


def test_consecutive_nan_steps_stop_the_run_before_it_saves(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=2", f"checkpoint.save={tmp_path}")
    with pytest.raises(RankFailed, match=r"TrainingDivergedError: 3 steps in a row up to step 3 had a NaN/Inf loss"):
        spawn(_diverging, 1, corpus, tmp_path)
    assert latest_iteration(tmp_path) == 2 and saved_iterations(tmp_path) == [2]


def _finetune(corpus, root, *extra):
    setup(_config(corpus, f"checkpoint.load={root}", "checkpoint.finetune=true", *extra))


def test_a_checkpoint_of_another_model_names_both(corpus, tmp_path):
    spawn(_train, 1, corpus, "train_steps=1", "model.config=lact_tiny", f"checkpoint.save={tmp_path}")
    with pytest.raises(RankFailed, match=r"holds a lact \(2 layers.*\) model; the config asks for deltanet \("):
        spawn(_finetune, 1, corpus, tmp_path)


def _data_position(corpus, other, root):
    trainer = setup(_config(other, f"checkpoint.load={root}", "train_steps=8"))
    return trainer.start_step, trainer.loader.state_dict()


def test_resume_on_other_data_restarts_the_data_position(corpus, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    spawn(_train, 1, corpus, "train_steps=3", f"checkpoint.save={tmp_path / 'ck'}")
    step, position = spawn(_data_position, 1, corpus, other, tmp_path / "ck")[0]
    assert step == 3 and position["epoch"] == position["shard"] == position["document"] == 0
    step, position = spawn(_data_position, 1, corpus, corpus, tmp_path / "ck")[0]
    assert step == 3 and position["document"] > 0


def test_data_of_another_tokenizer_with_the_same_vocabulary_is_refused(corpus, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**meta, "tokenizer_hash": "0" * 64}))
    spawn(_train, 1, corpus, "train_steps=1", f"checkpoint.save={tmp_path / 'ck'}")
    with pytest.raises(RankFailed, match=r"trained on data of another tokenizer .*checkpoint.allow_tokenizer_change=true"):
        spawn(_finetune, 1, str(other), tmp_path / "ck")
    spawn(_finetune, 1, str(other), tmp_path / "ck", "checkpoint.allow_tokenizer_change=true")
