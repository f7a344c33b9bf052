"""LaCT's large-chunk fast-weight SwiGLU (`lact_swiglu`) and its decoding step (`lact_swiglu_step`).

Layout `[B, T, H, D]` for q, k, v (q and k already SiLU'd and L2-normalised per head by the layer, as in
the LaCT language model); per-token learning rates `[B, T, H]` for each of w0, w1, w2; momentum
coefficients `[B, T, H]` (after the sigmoid). Initial fast weights are learned parameters `[H, Dh, D]`
(w0, w2) and `[H, D, Dh]` (w1), copied per sequence, or already per sequence `[N, H, ...]`. Packed sequences
as in fla: `[1, total, ...]` with `cu_seqlens [N + 1]` (see `kernels/varlen.py`); a sequence can also run on
from a `LaCTState` (`initial_state`). The PyTorch path (fp32) runs everywhere; there is no fused kernel yet.

On CUDA neither `lact_swiglu` nor a decode loop of `lact_swiglu_step` reads a tensor on the host (no stream
sync per layer or step), except: a packed layout's lengths, once per `cu_seqlens` tensor; `states_after` (which
chunks it needs is data); a continuation from a state (its partial chunks set the length); and the first step
from a state made elsewhere (see `chunk.py`). The value checks (finite rates, `cu_seqlens` contents, the
range of positions given to `states_after`) run on CPU tensors only unless `set_debug_checks(True)` (see
`kernels/utils.py`).
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
from megatron_refine.kernels.utils import check_finite, check_positions, check_rank, check_shape, compute_dtype
from megatron_refine.kernels.varlen import (
    ChunkLayout,
    batch_cu_seqlens,
    check_cu_seqlens,
    packed_layout,
    prepare_lens,
    prepare_position_ids,
    prepare_sequence_ids,
)

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


def _batched_weight(name: str, w: torch.Tensor, N: int, H: int, shape: tuple[int, int]) -> torch.Tensor:
    if w.ndim == 3:
        check_shape(name, w, (H, *shape), "[H, rows, cols] (learned, copied per sequence)")
        return w.expand(N, *w.shape)
    check_rank(name, w, 4, "[H, rows, cols] or [N, H, rows, cols]")
    check_shape(name, w, (N, H, *shape), "[N, H, rows, cols] (one per sequence)")
    return w


def lact_swiglu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr0: torch.Tensor,
    lr1: torch.Tensor,
    lr2: torch.Tensor,
    w0: torch.Tensor | None,
    w1: torch.Tensor | None,
    w2: torch.Tensor | None,
    *,
    chunk_size: int = 2048,
    momentum: torch.Tensor | None = None,
    use_muon: bool = False,
    weight_norm: bool = True,
    ns_coefficients: Sequence[tuple[float, float, float]] = LACT_NS_COEFFICIENTS,
    output_final_state: bool = False,
    output_states_after: bool = False,
    initial_state: LaCTState | None = None,
    cu_seqlens: torch.Tensor | None = None,
):
    """Block-causal LaCT fast-weight SwiGLU over whole sequences.

    Args:
        q, k, v: [B, T, H, D].  lr0, lr1, lr2: [B, T, H] per-token rates for w0, w1, w2 (after softplus).
        w0, w2: [H, Dh, D] or [N, H, Dh, D];  w1: [H, D, Dh] or [N, H, D, Dh]: the initial fast weights
            (None when `initial_state` is given).
        chunk_size: tokens per update (2048 in the published models).
        momentum: [B, T, H] momentum coefficients in (0, 1), or None for no momentum.
        use_muon: orthogonalise each update with Newton-Schulz-5 (`ns_coefficients`).
        weight_norm: rescale each weight row to its initial L2 norm after every update.
        output_final_state: also return the `LaCTState` after the last token of each sequence.
        output_states_after: also return `states_after`, a function of positions [B, P] (chosen after the
            forward) -> the states after those tokens as one `LaCTState` of B * P rows ordered (b, p), read
            from this forward's per-chunk weights, differentiable w.r.t. every input. With cu_seqlens,
            positions index the packed time axis.
        initial_state: continue N sequences from a `LaCTState` of N rows (its weights, momentum, weight-norm
            targets and partial chunk), e.g. from `states_after` or a decoding cache.
        cu_seqlens: [N + 1] packed sequence starts (inputs [1, total, ...]): every sequence starts from its
            own initial weights and its chunks start at its first token.

    Returns:
        (o [B, T, H, D], final LaCTState (N rows) or None), plus `states_after` when `output_states_after`.
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
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    flat = lambda x: None if x is None else x.flatten(0, 1)  # noqa: E731
    q, k, v, momentum = flat(q), flat(k), flat(v), flat(momentum)
    lr = flat(torch.stack([lr0, lr1, lr2], dim=-1))  # [total, H, 3]

    if initial_state is None:
        if w0 is None or w1 is None or w2 is None:
            raise ValueError("pass the initial fast weights w0, w1, w2, or an initial_state to continue from")
        if w0.shape[-1] != D or w1.shape[-2] != D:
            raise ValueError(
                f"fast weights do not match the head dim {D} of q: w0 {tuple(w0.shape)}, w1 {tuple(w1.shape)} "
                "(expected w0/w2 [.., Dh, D] and w1 [.., D, Dh])"
            )
        Dh = w0.shape[-2]
        weights = (
            _batched_weight("w0", w0, N, H, (Dh, D)),
            _batched_weight("w1", w1, N, H, (D, Dh)),
            _batched_weight("w2", w2, N, H, (Dh, D)),
        )
        norms = tuple(x.to(compute_dtype(q)).norm(dim=-1, keepdim=True) for x in weights) if weight_norm else None
        dw = tuple(torch.zeros_like(x, dtype=compute_dtype(q)) for x in weights) if momentum is not None else None
        if cu_seqlens is None:
            layout = ChunkLayout.for_batch(B, T, chunk_size, q.device)
        else:
            layout = packed_layout(cu_seqlens, chunk_size)
        o, final, flat_states_after = lact_swiglu_torch(
            q, k, v, lr, momentum, layout, weights, norms, dw, use_muon, ns_coefficients, output_final_state,
            output_states_after,
        )
    else:
        packed = cu_seqlens if cu_seqlens is not None else batch_cu_seqlens(B, T, q.device)
        o, final, flat_states_after = _continue(
            initial_state, q, k, v, lr, momentum, packed, use_muon, ns_coefficients, output_final_state,
            output_states_after,
        )
    o = o.view(B, T, H, D)
    if not output_states_after:
        return o, final

    def states_after(positions: torch.Tensor) -> LaCTState:  # [B, P] -> B * P rows
        check_positions(positions, B, T)
        return flat_states_after((positions + torch.arange(B, device=positions.device)[:, None] * T).flatten())

    return o, final, states_after


def _continue(state: LaCTState, q, k, v, lr, momentum, cu_seqlens, use_muon, ns_coefficients, output_final_state,
              output_states_after):
    """Run packed sequences on from a state: each sequence's partial chunk is put back in front of its new
    tokens, so chunks complete where they would have, and the chunked path runs unchanged."""
    N, C = state.length.shape[0], state.chunk_size
    if cu_seqlens.numel() - 1 != N:
        raise ValueError(f"initial_state has {N} rows but the input holds {cu_seqlens.numel() - 1} sequences")
    if (momentum is None) != (state.dw is None):
        raise ValueError("momentum must be passed exactly when initial_state carries momentum")
    lens = prepare_lens(cu_seqlens)
    ell = state.length  # [N] tokens already in each partial chunk
    virtual_cu = torch.cat([cu_seqlens.new_zeros(1), torch.cumsum(lens + ell, 0)])
    total_v = int(virtual_cu[-1])  # host reads here and in the layout: the partial chunks' lengths are data
    seq = prepare_sequence_ids(virtual_cu, total_v)
    within = prepare_position_ids(virtual_cu, total_v)
    from_state = within < ell[seq]  # [total_v]
    new_index = (cu_seqlens[seq] + within - ell[seq]).clamp(min=0)
    state_index = (seq * C + within).clamp(max=N * C - 1)

    def virtual(x_new: torch.Tensor, x_state: torch.Tensor | None) -> torch.Tensor:
        old = x_new.new_zeros(total_v, *x_new.shape[1:]) if x_state is None else x_state.flatten(0, 1)[state_index]
        mask = from_state.view(-1, *([1] * (x_new.ndim - 1)))
        return torch.where(mask, old.to(x_new.dtype), x_new[new_index])

    acc = state.w0.dtype
    qv = virtual(q.to(acc), None)  # the partial chunk's outputs are discarded
    kv, vv, lrv = virtual(k.to(acc), state.k), virtual(v.to(acc), state.v), virtual(lr.to(acc), state.lr)
    mv = None if momentum is None else virtual(momentum.to(acc), state.momentum)

    def to_virtual(positions: torch.Tensor) -> torch.Tensor:  # indices of new tokens -> into the virtual sequences
        s = torch.searchsorted(cu_seqlens, positions, right=True) - 1
        return positions + virtual_cu[s] + ell[s] - cu_seqlens[s]

    layout = ChunkLayout.build(virtual_cu, C)  # a new tensor per call: nothing to cache
    o, final, virtual_states_after = lact_swiglu_torch(
        qv, kv, vv, lrv, mv, layout, (state.w0, state.w1, state.w2), state.norms, state.dw,
        use_muon, ns_coefficients, output_final_state, output_states_after,
    )
    states_after = (lambda positions: virtual_states_after(to_virtual(positions))) if output_states_after else None
    return o[to_virtual(torch.arange(q.shape[0], device=q.device))], final, states_after


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
