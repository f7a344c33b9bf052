"""The console script and the README's main job."""

import os
import subprocess
import sys

import pytest

from megatron_refine.cli import build_parser
from megatron_refine.demo import DemoConfig, run
from megatron_refine.evaluation.recall_tasks import RECALL_TASKS


def test_console_script_lists_its_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_refine.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "train", "eval", "preprocess", "model-info", "convert-to-hf", "convert-from-hf",
                    "parquet-to-jsonl", "info"):
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


def test_demo_runs_end_to_end_at_small_scale(tmp_path, capsys):
    """The README's main job with a few steps: corpus, 2-rank NTP pretraining, REFINE and matched NTP
    continuations, recall evaluations, post-training (nested REFINE, SFT) and test-time training scored on
    questions, checkpoints, plots, and the Hugging Face export checked by generating."""
    cfg = DemoConfig(out_dir=str(tmp_path), device="cpu", steps=12, continue_steps=4, documents=160, seq_length=64,
                     micro_batch_size=2, hidden_size=32, num_layers=1, eval_samples=1, post_steps=2, qa_samples=3,
                     qa_train=8)
    result = run(cfg)
    runs, export = result["runs"], result["hf_export"]
    hf = tmp_path / "hf" / "refine-mid"
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert export["path"] == str(hf) and export["prompts"] == 4 and export["agree"] == 4  # fp32 on both sides
    out = capsys.readouterr().out
    assert f"{hf}: transformers generate == megatron decoder on 4/4 prompts" in out
    assert len(runs["ntp"]["losses"]) == 12 and runs["ntp"]["losses"][-1] < runs["ntp"]["losses"][0]
    assert len(runs["refine-mid"]["losses"]) == len(runs["ntp-continued"]["losses"]) == 4
    assert [h["step"] for h in runs["refine-mid"]["refine"]] == [2, 4] and not runs["ntp-continued"]["refine"]
    for name, r in runs.items():  # each stage scored on the task file, and its results written
        assert [(row["task"], row["n"]) for row in r["eval"]] == [(task, 1) for task in RECALL_TASKS]
        assert all(0 <= row["ci_low"] <= row["score"] <= row["ci_high"] <= 1 for row in r["eval"])
        assert (tmp_path / "eval" / name / "results.csv").is_file()
    assert "held-out recall after each stage" in out and "NTP pretrained" in out and "+ REFINE" in out
    post = result["post"]
    assert [len(post["losses"][name]) for name in ("sft", "refine-post")] == [2, 2]
    for name in ("refine-mid", "sft", "refine-post", "ttt"):  # the QA table's four columns, each written
        assert [(row["task"], row["n"]) for row in post["eval"][name]] == [("qa_table", 3), ("qa_registry", 3), ("qa_facts", 3)]
        assert (tmp_path / "eval" / "qa" / name / "results.csv").is_file()
    assert "held-out questions after post-training and test-time training" in out and "+ nested REFINE + TTT" in out
    for name in ("sft", "refine-post"):
        assert (tmp_path / "checkpoints" / name / "latest_checkpointed_iteration.txt").read_text() == "2"
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
    with pytest.raises(ValueError, match="--finetune needs --load"):
        args.func(args)


def test_overwrite_sets_the_checkpoint_field():
    from megatron_refine.training import load_config

    args = build_parser().parse_args(["train", "--overwrite"])
    assert args.overwrite and load_config(None, ["checkpoint.overwrite=true"]).checkpoint.overwrite


def _console(*argv, **env):
    """The console script in a fresh interpreter: (exit code, stderr lines)."""
    out = subprocess.run([sys.executable, "-m", "megatron_refine.cli", *argv], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    return out.returncode, out.stderr.splitlines()


def test_a_bad_config_value_is_one_line_and_exit_code_2():
    assert _console("train", "--set", "refine.every=0") == (2, ["megatron-refine: error: refine.every must be >= 1, got 0"])


def test_a_missing_data_path_is_one_line_and_exit_code_2_on_every_rank_count(tmp_path):
    """Under --nproc 2 both ranks fail alike: one line (rank 0's), not a traceback per rank."""
    code, err = _console("train", "--set", f"data.path={tmp_path / 'absent'}", "--set", "device=cpu", "--nproc", "2")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"megatron-refine: error: data path {tmp_path / 'absent'} does not exist"), err


def test_loading_a_folder_without_a_checkpoint_is_one_line_and_exit_code_2(tmp_path):
    from megatron_refine.data import write_builtin_corpus

    write_builtin_corpus(tmp_path / "data", 40, seed=0, shard_size=10, progress=False)
    (tmp_path / "empty").mkdir()
    code, err = _console("train", "--config", "tiny-deltanet", "--set", f"data.path={tmp_path / 'data'}",
                         "--set", "device=cpu", "--set", "data.seq_length=48", "--load", str(tmp_path / "empty"))
    assert code == 2 and len(err) == 1 and err[0].startswith(f"megatron-refine: error: no checkpoint in {tmp_path / 'empty'}"), err


@pytest.fixture
def cli(monkeypatch, capsys):
    """main() in this process (its config errors need no fresh interpreter): (exit code, stderr lines)."""
    from megatron_refine.cli import main

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)  # main() extends it for the ranks it may start
    monkeypatch.delenv("RANK", raising=False)

    def run(*argv):
        with pytest.raises(SystemExit) as exit:
            main(list(argv))
        return exit.value.code, capsys.readouterr().err.splitlines()

    return run


@pytest.mark.parametrize("value, message", [
    ("data.seq_length=5.5", "data.seq_length expects an integer, got 5.5"),
    ("checkpoint.finetune=flase", "checkpoint.finetune expects true or false (or yes/no, 1/0), got 'flase'"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1: the checkpoint just written is always kept (got 0)"),
])
def test_config_errors_are_one_line(cli, value, message):
    assert cli("train", "--set", value) == (2, [f"megatron-refine: error: {message}"])


def test_other_subcommands_report_errors_as_one_line(cli, tmp_path):
    assert cli("model-info", "--config", "gpt5")[0] == 2
    code, err = cli("preprocess", "--input", str(tmp_path / "absent.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and err[0].startswith("megatron-refine: error: "), err


def test_under_torchrun_only_rank_0_prints_the_error(cli, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli("train", "--set", "refine.every=0") == (2, [])


def test_debug_shows_the_traceback_before_or_after_the_subcommand(monkeypatch):
    from megatron_refine.cli import main

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    for argv in (["--debug", "train"], ["train", "--debug"]):
        with pytest.raises(ValueError, match="refine.every must be >= 1"):
            main([*argv, "--set", "refine.every=0"])


def test_an_unknown_error_keeps_its_traceback(monkeypatch):
    """A bug is not a user's mistake: no one-line summary that hides where it happened."""
    import megatron_refine.cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    monkeypatch.setattr(megatron_refine.cli, "_info", broken)
    with pytest.raises(KeyError, match="a bug"):
        megatron_refine.cli.main(["info"])


def test_the_demo_fits_its_ranks_to_the_gpus(monkeypatch):
    """One NCCL rank per GPU: on a 1-GPU host the demo runs 1 rank (same tokens a step), never 2 on cuda:0."""
    import torch

    from megatron_refine.demo import _global_batch, resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = resolve_devices(DemoConfig())
    assert (cfg.device, cfg.nproc, _global_batch(cfg)) == ("cuda", 1, 16)
    assert resolve_devices(DemoConfig(device="cpu")).nproc == 2
    with pytest.raises(ValueError, match="--nproc 2 needs 2 GPUs, this host has 1: use --nproc 1 or --device cpu"):
        resolve_devices(DemoConfig(nproc=2))
