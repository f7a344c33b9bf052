"""Input checks shared by the fast-weight ops: errors a caller can cause get a message naming the fix."""

from __future__ import annotations

import torch


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
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; check the projection producing it (and the loss scale)")


def check_positions(positions: torch.Tensor, batch: int, length: int) -> None:
    """`positions [B, P]`: token indices in [0, T) whose post-token state is requested."""
    check_rank("states_at", positions, 2, "[B, P]")
    if positions.shape[0] != batch:
        raise ValueError(f"states_at has batch {positions.shape[0]}, the inputs have batch {batch}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"states_at must hold integer positions, got {positions.dtype}")
    if positions.numel() and (positions.min() < 0 or positions.max() >= length):
        raise ValueError(
            f"states_at positions must lie in [0, {length}) (the sequence length), got "
            f"[{int(positions.min())}, {int(positions.max())}]"
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
