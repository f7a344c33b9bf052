"""The console script and the README's main job."""

import subprocess
import sys

import pytest

from megatron_refine.cli import build_parser
from megatron_refine.demo import DemoConfig, run


def test_console_script_lists_its_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_refine.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "train", "preprocess", "model-info", "info"):
        assert command in out


def test_info_reports_the_backend(capsys):
    args = build_parser().parse_args(["info"])
    args.func(args)
    out = capsys.readouterr().out
    assert "megatron-core" in out and "backend" in out


def test_unknown_subcommand_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frobnicate"])


def test_model_info_rejects_an_unknown_config():
    args = build_parser().parse_args(["model-info", "--config", "gpt5"])
    with pytest.raises(ValueError, match="unknown model config 'gpt5'; available: deltanet_1p3b"):
        args.func(args)


def test_demo_runs_end_to_end_at_small_scale(tmp_path):
    """The README's main job with a few steps: corpus, 2-rank NTP pretraining, REFINE and matched NTP
    continuations, recall evaluations, checkpoints, plots."""
    cfg = DemoConfig(out_dir=str(tmp_path), device="cpu", steps=12, continue_steps=4, documents=160, seq_length=64,
                     micro_batch_size=2, hidden_size=32, num_layers=1, recall_examples=4)
    runs = run(cfg)["runs"]
    assert len(runs["ntp"]["losses"]) == 12 and runs["ntp"]["losses"][-1] < runs["ntp"]["losses"][0]
    assert len(runs["refine-mid"]["losses"]) == len(runs["ntp-continued"]["losses"]) == 4
    assert [h["step"] for h in runs["refine-mid"]["refine"]] == [2, 4] and not runs["ntp-continued"]["refine"]
    assert all(r["recall"].examples == 4 and 0 <= r["recall"].exact_match <= 1 for r in runs.values())
    for name, last in (("ntp", 12), ("refine-mid", 4), ("ntp-continued", 4)):
        assert (tmp_path / "checkpoints" / name / "latest_checkpointed_iteration.txt").read_text() == str(last)
    assert (tmp_path / "loss.png").stat().st_size > 1000 and (tmp_path / "reward.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard" / "refine-mid").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "refine-mid")).Reload()
    for tag in ("refine/reward_mean", "refine/logprob_diff_mean", "refine/logprob_diff_max", "refine/ratio_mean"):
        assert [e.step for e in events.Scalars(tag)] == [2, 4], tag
    assert all(e.value < 1e-3 for e in events.Scalars("refine/logprob_diff_max"))  # fp32 CPU: rounding level


def _train_cli(data):
    from megatron_refine.cli import main

    main(["train", "--config", "tiny-deltanet", "--set", f"data.path={data}", "--set", "train_steps=2",
          "--set", "optimizer.warmup_steps=1", "--set", "data.seq_length=48", "--set", "device=cpu", "--stage", "refine-mid"])


def test_train_command_runs_the_refine_stage_from_a_named_config(tmp_path):
    from megatron_refine.data import write_builtin_corpus
    from megatron_refine.runtime import spawn

    write_builtin_corpus(tmp_path, 40, seed=0, shard_size=10, progress=False)
    spawn(_train_cli, 2, str(tmp_path))


def test_finetune_without_load_is_rejected():
    args = build_parser().parse_args(["train", "--finetune"])
    with pytest.raises(SystemExit, match="--finetune needs --load"):
        args.func(args)


def test_the_demo_fits_its_ranks_to_the_gpus(monkeypatch):
    """One NCCL rank per GPU: on a 1-GPU host the demo runs 1 rank (same tokens a step), never 2 on cuda:0."""
    import torch

    from megatron_refine.demo import _global_batch, _resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = _resolve_devices(DemoConfig())
    assert (cfg.device, cfg.nproc, _global_batch(cfg)) == ("cuda", 1, 16)
    assert _resolve_devices(DemoConfig(device="cpu")).nproc == 2
    with pytest.raises(ValueError, match="--nproc 2 needs 2 GPUs, this host has 1: use --nproc 1 or --device cpu"):
        _resolve_devices(DemoConfig(nproc=2))
