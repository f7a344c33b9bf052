"""Input checks shared by the fast-weight ops: errors a caller can cause get a message naming the fix.

Metadata checks (type, rank, dtype, shapes) are free and always run. Value checks (NaN / Inf, `cu_seqlens`
contents, the ranges of positions read by `states_after`) read tensor values on the host; on CUDA that stalls
the stream, once per layer and decoding step, so by default they run on CPU tensors only (where a read costs no
device sync). On CUDA the packed document starts are validated once per forward where the model builds them
(`models/packing.py`).
`set_debug_checks(True)` (or `MEGATRON_REFINE_DEBUG_CHECKS=1`) runs them on every device, `False` (`=0`) nowhere.
"""

from __future__ import annotations

import os

import torch

DEBUG_CHECKS_ENV = "MEGATRON_REFINE_DEBUG_CHECKS"


def _mode_from_env() -> bool | None:
    value = os.environ.get(DEBUG_CHECKS_ENV, "").strip().lower()
    return None if value in ("", "auto") else value not in ("0", "false", "off")


_debug_checks: bool | None = _mode_from_env()


def set_debug_checks(mode: bool | None) -> None:
    """Value checks: True on every device (a host sync per op call on CUDA: for debugging), False never,
    None (the default) on CPU tensors only."""
    global _debug_checks
    _debug_checks = mode


def get_debug_checks() -> bool | None:
    return _debug_checks


def value_checks_on(x: torch.Tensor) -> bool:
    """Whether the value checks read `x` (see `set_debug_checks`)."""
    return x.device.type == "cpu" if _debug_checks is None else _debug_checks


def version_of(x: torch.Tensor) -> int:
    """`x`'s in-place version counter, for caches keyed by a tensor (-1 for inference tensors: they keep none)."""
    return -1 if x.is_inference() else x._version


def check_rank(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor with layout {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {tuple(expected)} {layout} to match the other inputs"
        )


def check_finite(name: str, x: torch.Tensor) -> None:
    """A value check (`set_debug_checks`)."""
    if value_checks_on(x) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; check the projection producing it (and the loss scale)")


def check_positions(positions: torch.Tensor, batch: int, length: int) -> None:
    """`positions [B, P]`: token indices in [0, T) whose post-token state is requested (range: a value check)."""
    check_rank("positions", positions, 2, "[B, P]")
    if positions.shape[0] != batch:
        raise ValueError(f"positions have batch {positions.shape[0]}, the inputs have batch {batch}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be integers, got {positions.dtype}")
    if positions.numel() and value_checks_on(positions):
        low, high = (int(x) for x in torch.aminmax(positions))
        if low < 0 or high >= length:
            raise ValueError(
                f"positions must lie in [0, {length}) (the sequence length), got [{low}, {high}]"
            )


def pad_time(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) of a [B, T, ...] tensor up to a multiple of `multiple`."""
    pad = (-x.shape[1]) % multiple
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for half and single precision inputs, fp64 kept (for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
