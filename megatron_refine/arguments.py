"""argparse types shared by the command lines: a value outside its valid range fails at parse time, with the range
in argparse's one-line error (exit code 2), instead of running on as something else (0 documents a shard, a
negative step time, a default silently taken for --nodes 0)."""

from __future__ import annotations

import argparse


def at_least(minimum: int | float, kind: type = int, note: str = ""):
    """An argparse `type`: a `kind` >= minimum; `note` says what a value means (e.g. 0: off)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not value >= minimum:  # `not >=`: a float NaN fails too
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{note}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"  # argparse's fallback name
    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)


def fraction(text: str) -> float:
    """An argparse `type`: a float in (0, 1], e.g. a utilisation."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
