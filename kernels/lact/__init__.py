"""LaCT's large-chunk fast-weight SwiGLU (`lact_swiglu`) and its decoding step (`lact_swiglu_step`).

Layout `[B, T, H, D]` for q, k, v (q and k already SiLU'd and L2-normalised per head by the layer, as in
the LaCT language model); per-token learning rates `[B, T, H]` for each of w0, w1, w2; momentum
coefficients `[B, T, H]` (after the sigmoid). Initial fast weights are learned parameters `[H, Dh, D]`
(w0, w2) and `[H, D, Dh]` (w1), copied per sequence, or already per sequence `[B, H, ...]`.
The PyTorch path (fp32) runs everywhere; there is no fused kernel yet.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_refine.kernels.lact.chunk import LaCTState, lact_swiglu_step_torch, lact_swiglu_torch
from megatron_refine.kernels.lact.muon import (
    LACT_NS_COEFFICIENTS,
    MUON_NS_COEFFICIENTS,
    zeropower_via_newtonschulz5,
)
from megatron_refine.kernels.utils import check_finite, check_positions, check_rank, check_shape

__all__ = [
    "LACT_NS_COEFFICIENTS",
    "MUON_NS_COEFFICIENTS",
    "LaCTState",
    "lact_swiglu",
    "lact_swiglu_step",
    "low_rank_fast_weight",
    "zeropower_via_newtonschulz5",
]


def low_rank_fast_weight(w_left: torch.Tensor, w_right: torch.Tensor, identity_scale: float = 0.5) -> torch.Tensor:
    """LaCT's low-rank parameterisation of an initial fast weight: w_left @ w_right + identity_scale * I.

    w_left [H, rows, r], w_right [H, r, cols] -> [H, rows, cols] (I is the rectangular identity).
    """
    check_rank("w_left", w_left, 3, "[H, rows, rank]")
    check_rank("w_right", w_right, 3, "[H, rank, cols]")
    if w_left.shape[0] != w_right.shape[0] or w_left.shape[2] != w_right.shape[1]:
        raise ValueError(
            f"w_left {tuple(w_left.shape)} and w_right {tuple(w_right.shape)} do not chain: "
            "expected [H, rows, r] and [H, r, cols]"
        )
    rows, cols = w_left.shape[1], w_right.shape[2]
    eye = torch.eye(rows, cols, dtype=w_left.dtype, device=w_left.device)
    return w_left @ w_right + identity_scale * eye


def _batched_weight(name: str, w: torch.Tensor, B: int, H: int, shape: tuple[int, int]) -> torch.Tensor:
    if w.ndim == 3:
        check_shape(name, w, (H, *shape), "[H, rows, cols] (learned, copied per sequence)")
        return w.expand(B, *w.shape)
    check_rank(name, w, 4, "[H, rows, cols] or [B, H, rows, cols]")
    check_shape(name, w, (B, H, *shape), "[B, H, rows, cols]")
    return w


def lact_swiglu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    chunk_size: int = 2048,
    momentum: torch.Tensor | None = None,
    use_muon: bool = False,
    weight_norm: bool = True,
    ns_coefficients: Sequence[tuple[float, float, float]] = LACT_NS_COEFFICIENTS,
    output_final_state: bool = False,
    states_at: torch.Tensor | None = None,
):
    """Block-causal LaCT fast-weight SwiGLU over whole sequences.

    Args:
        q, k, v: [B, T, H, D].  lr0, lr1, lr2: [B, T, H] per-token rates for w0, w1, w2 (after softplus).
        w0, w2: [H, Dh, D] or [B, H, Dh, D];  w1: [H, D, Dh] or [B, H, D, Dh]: the initial fast weights.
        chunk_size: tokens per update (2048 in the published models).
        momentum: [B, T, H] momentum coefficients in (0, 1), or None for no momentum.
        use_muon: orthogonalise each update with Newton-Schulz-5 (`ns_coefficients`).
        weight_norm: rescale each weight row to its initial L2 norm after every update.
        output_final_state: also return the `LaCTState` after the last token (for decoding on).
        states_at: [B, P] positions; also return the states after those tokens as one `LaCTState` of
            B * P rows ordered (b, p), differentiable w.r.t. every input.

    Returns:
        (o [B, T, H, D], final LaCTState or None), plus the position states when `states_at` is given.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 4, "[B, T, H, D]")
    B, T, H, D = q.shape
    check_shape("k", k, (B, T, H, D), "[B, T, H, D]")
    check_shape("v", v, (B, T, H, D), "[B, T, H, D]")
    for name, x in (("lr0", lr0), ("lr1", lr1), ("lr2", lr2)) + ((("momentum", momentum),) if momentum is not None else ()):
        check_rank(name, x, 3, "[B, T, H]")
        check_shape(name, x, (B, T, H), "[B, T, H]")
        check_finite(name, x)
    if w0.shape[-1] != D or w1.shape[-2] != D:
        raise ValueError(
            f"fast weights do not match the head dim {D} of q: w0 {tuple(w0.shape)}, w1 {tuple(w1.shape)} "
            "(expected w0/w2 [.., Dh, D] and w1 [.., D, Dh])"
        )
    Dh = w0.shape[-2]
    weights = (
        _batched_weight("w0", w0, B, H, (Dh, D)),
        _batched_weight("w1", w1, B, H, (D, Dh)),
        _batched_weight("w2", w2, B, H, (Dh, D)),
    )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if states_at is not None:
        check_positions(states_at, B, T)
    lr = torch.stack([lr0, lr1, lr2], dim=-1)  # [B, T, H, 3]
    o, final, states = lact_swiglu_torch(
        q, k, v, lr, weights, momentum, chunk_size, use_muon, weight_norm, ns_coefficients,
        output_final_state, states_at,
    )
    return (o, final) if states_at is None else (o, final, states)


def lact_swiglu_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
    state: LaCTState,
    *,
    momentum: torch.Tensor | None = None,
    use_muon: bool = False,
    ns_coefficients: Sequence[tuple[float, float, float]] = LACT_NS_COEFFICIENTS,
) -> tuple[torch.Tensor, LaCTState]:
    """One decoding token: q, k, v [N, H, D], rates and momentum [N, H] -> (o [N, H, D], new state).

    Weight norm follows the state (`state.norms`); momentum must be given iff the state carries it.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(name, x, 3, "[N, H, D]")
    N, H, D = q.shape
    check_shape("state.k", state.k, (N, state.chunk_size, H, D), "[N, C, H, D]")
    for name, x in (("lr0", lr0), ("lr1", lr1), ("lr2", lr2)):
        check_shape(name, x, (N, H), "[N, H]")
    if (momentum is None) != (state.dw is None):
        raise ValueError(
            "momentum must be passed exactly when the state was built with momentum "
            "(LaCTState.initial(..., use_momentum=True) or lact_swiglu(..., momentum=...))"
        )
    lr = torch.stack([lr0, lr1, lr2], dim=-1)
    o, state = lact_swiglu_step_torch(q, k, v, lr, momentum, state, use_muon, ns_coefficients)
    return o.to(v.dtype), state
