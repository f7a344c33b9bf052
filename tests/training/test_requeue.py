"""What a Slurm job meets between its runs: a requeue after the run finished trains nothing and exits 0, SIGTERM
(to any one rank) saves after the current step and the same command resumes there, and a resume takes the config's
schedule (Megatron-LM's --override-opt_param-scheduler) unless told to keep the checkpoint's."""

import contextlib
import io
import math
import os
import shutil
import signal

import pytest
import torch

from megatron_refine.runtime import spawn
from megatron_refine.training import load_config, setup, train
from megatron_refine.training.checkpointing import latest_iteration, saved_iterations

SEQ = 32
COMMON = [f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=4", "optimizer.warmup_steps=0",
          "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "logging.log_interval=100", "device=cpu"]


def _config(corpus, *extra):
    return load_config("tiny-deltanet", [f"data.path={corpus}", *COMMON, *extra])


def _train(corpus, *extra):
    return train(_config(corpus, *extra)).losses


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A checkpoint folder whose run finished: train_steps 4, cosine from 3e-3 to 3e-4."""
    root = tmp_path_factory.mktemp("finished")
    spawn(_train, 1, corpus, "train_steps=4", f"checkpoint.save={root}")
    return root


def _cli(argv):
    from megatron_refine.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)  # returns: exit code 0
    return out.getvalue()


@pytest.mark.parametrize("steps", [4, 3])
def test_a_requeue_after_the_run_finished_trains_nothing(corpus, finished, tmp_path, steps):
    root = tmp_path / "ck"
    shutil.copytree(finished, root)
    sets = [*COMMON, f"data.path={corpus}", f"train_steps={steps}", f"checkpoint.save={root}"]
    argv = ["train", "--config", "tiny-deltanet", *[x for s in sets for x in ("--set", s)], "--load", str(root)]
    out = spawn(_cli, 1, argv)[0]
    assert f"{root} is already at step 4 of train_steps {steps}: nothing to train" in out and "done:" not in out
    assert saved_iterations(root) == [4]


def _schedules(corpus, root):
    """The learning rate at the resumed step with a new lr / min_lr and twice the train_steps, and the console."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lrs = [setup(_config(corpus, f"checkpoint.load={root}", "train_steps=8", "optimizer.lr=1e-2",
                             "optimizer.min_lr=1e-3", *extra)).optimizer.param_groups[0]["lr"]
               for extra in ([], ["optimizer.use_checkpoint_opt_param_scheduler=true"])]
    return lrs, out.getvalue()


def test_a_resume_takes_the_configs_schedule_and_says_so(corpus, finished):
    (applied, kept), out = spawn(_schedules, 1, corpus, finished)[0]
    assert math.isclose(applied, 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 4 / 8)))  # step 4 of 8
    assert math.isclose(kept, 3e-4)  # the checkpoint's schedule had decayed to its min_lr
    assert ("the config's from step 4: optimizer.lr 0.003 -> 0.01, optimizer.min_lr 0.0003 -> 0.001, "
            "optimizer.lr_decay_steps (train_steps) 4 -> 8 (checkpoint -> config)") in out
    assert "the checkpoint's (optimizer.use_checkpoint_opt_param_scheduler), not the config's" in out


def _terminated_at(corpus, root, step, rank, *extra):
    """Train; rank `rank` alone gets SIGTERM during `step`, as from Slurm's scancel or time limit."""
    import megatron_refine.training.trainer as trainer_module

    real_step = trainer_module.train_step

    def train_step(trainer, batches, n=1, stored=None):
        if n == step and torch.distributed.get_rank() == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(trainer, batches, n, stored)

    trainer_module.train_step = train_step
    result = train(_config(corpus, f"checkpoint.save={root}", f"checkpoint.load={root}", *extra))
    return result.losses, result.stopped_by


def test_sigterm_saves_after_the_step_and_the_same_command_resumes(corpus, tmp_path):
    full = spawn(_train, 2, corpus, "train_steps=6", f"checkpoint.save={tmp_path / 'full'}")[0]
    stopped = spawn(_terminated_at, 2, corpus, tmp_path / "ck", 2, 1, "train_steps=6")
    assert [(len(losses), by) for losses, by in stopped] == [(2, "SIGTERM")] * 2  # rank 0 stopped with rank 1
    assert latest_iteration(tmp_path / "ck") == 2
    resumed = spawn(_train, 2, corpus, "train_steps=6", f"checkpoint.save={tmp_path / 'ck'}",
                    f"checkpoint.load={tmp_path / 'ck'}")[0]
    assert stopped[0][0] + resumed == full  # bitwise: nothing lost, nothing repeated


def test_sigterm_inside_a_rollout_round_saves_after_the_round(corpus, tmp_path):
    """A round's stored rollouts are not checkpointed: the run finishes the round, then saves."""
    rounds = ["stage=refine-mid", "refine.mini_batches=2", "refine.n_chunks=2", "refine.margin=5", "refine.k=3",
              "data.seq_length=64", "train_steps=4"]
    (losses, stopped_by), = spawn(_terminated_at, 1, corpus, tmp_path, 1, 0, *rounds)
    assert (len(losses), stopped_by, saved_iterations(tmp_path)) == (2, "SIGTERM", [2])
