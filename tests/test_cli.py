"""The console script and the README's main job."""

import subprocess
import sys

import pytest

from megatron_refine.cli import build_parser
from megatron_refine.demo import DemoConfig, best_loss, run


def test_console_script_lists_its_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "megatron_refine.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in out and "info" in out


def test_info_reports_the_backend(capsys):
    args = build_parser().parse_args(["info"])
    args.func(args)
    out = capsys.readouterr().out
    assert "megatron-core" in out and "backend" in out


def test_unknown_subcommand_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["frobnicate"])


def test_demo_trains_at_tp2_and_reloads_at_tp1(tmp_path):
    result = run(DemoConfig(steps=40, out_dir=str(tmp_path)))
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["eval_loss"] < 2 * best_loss(DemoConfig.vocab_size)
    assert abs(result["reloaded_eval_loss"] - result["eval_loss"]) < 1e-4
    assert (tmp_path / "checkpoint" / "metadata.json").exists()


def test_model_info_rejects_an_unknown_config():
    args = build_parser().parse_args(["model-info", "--config", "gpt5"])
    with pytest.raises(ValueError, match="unknown model config 'gpt5'; available: deltanet_1p3b"):
        args.func(args)
