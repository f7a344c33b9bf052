"""Nonsense numbers on the command line fail at parse time, naming the valid range (argparse: exit code 2)."""

import argparse

import pytest

from megatron_refine.arguments import at_least, fraction, positive_int
from megatron_refine.cli import build_parser


@pytest.mark.parametrize("argv, message", [
    (["preprocess", "--output-dir", "o", "--shard-size", "0"], "argument --shard-size: must be >= 1, got 0"),
    (["preprocess", "--output-dir", "o", "--shard-size", "-3"], "argument --shard-size: must be >= 1, got -3"),
    (["preprocess", "--output-dir", "o", "--builtin-corpus", "-5"], "argument --builtin-corpus: must be >= 1, got -5"),
    (["preprocess", "--output-dir", "o", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["preprocess", "--output-dir", "o", "--workers", "-2"], "argument --workers: must be >= 1, got -2"),
    (["train", "--nproc", "0"], "argument --nproc: must be >= 1, got 0"),
    (["eval", "--load", "c", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "--load", "c", "--ttt", "ntp", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    # -1 sliced a task file from its end: 7 of 8 examples scored
    (["eval", "--load", "c", "--samples", "-1"], "argument --samples: must be >= 0, got -1"),
    (["eval", "--load", "c", "--max-prompt-tokens", "1"], "argument --max-prompt-tokens: must be >= 2, got 1"),
    (["convert-from-hf", "--load", "h", "--save", "c", "--tp", "0"], "argument --tp: must be >= 1, got 0"),
    (["demo", "--steps", "x"], "argument --steps: expects an integer, got 'x'"),
])
def test_out_of_range_numbers_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_the_types_take_the_valid_range():
    assert positive_int("3") == 3 and at_least(0, float)("0") == 0.0 and fraction("1") == 1.0
    for parse, text in ((at_least(0, float), "nan"), (fraction, "0"), (fraction, "-1"), (fraction, "1.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_min_lr_above_lr_is_one_line_not_an_assertion(monkeypatch, capsys):
    """Megatron's OptimizerParamScheduler asserted it on every rank, after the model was built."""
    from megatron_refine.cli import main

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit:
        main(["train", "--set", "optimizer.lr=1e-4", "--set", "optimizer.min_lr=1e-3", "--dry-run"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "megatron-refine: error: optimizer.min_lr (0.001) is above optimizer.lr (0.0001): the schedule decays from lr "
        "to min_lr; lower min_lr (or set both equal for a constant rate)"]
