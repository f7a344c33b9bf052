"""DeltaNet's delta rule and Gated DeltaNet's gated delta rule: `delta_rule` / `gated_delta_rule` (chunked,
training and prefill) and `delta_rule_step` / `gated_delta_rule_step` (decoding).

The gated rule decays the state by a_t = exp(g_t) before each write, g [B, T, H] a log decay (<= 0, fp32):
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,   o_t = S_t^T (scale q_t);
DeltaNet's is the case g = 0. Both run one implementation (`chunk.py`, `recurrent.py`, `fla_path.py`) with g
optional: without g no decay is computed.

Layout `[B, T, H, D]` (fla's); fast-weight state `[B, H, K, V]`; q and k L2-normalised by the caller;
scale defaults to K^-0.5. Packed sequences as in fla: `[1, total, ...]` with `cu_seqlens [N + 1]`, states
`[N, H, K, V]` (see `kernels/varlen.py`). On CUDA with fla installed and a bf16/fp16 input, the chunked ops
run fla's Triton `chunk_delta_rule` / `chunk_gated_delta_rule` (varlen and branch states included,
`fla_path.py`; also on a CPU in fp16 under Triton's interpreter, as the tests run it); everywhere else (and
with `use_reference=True`) they run the PyTorch chunked algorithm in `chunk.py`, accumulating in fp32.

No op here reads a tensor on the host on CUDA (no stream sync per layer or decoding step), except a packed
layout's lengths, once per `cu_seqlens` tensor. The value checks (finite beta and g, `cu_seqlens` contents, the
range of positions given to `states_after`) run on CPU tensors only unless `set_debug_checks(True)` (see
`kernels/utils.py`).
"""

from __future__ import annotations

import torch

from megatron_refine.kernels.delta_rule.chunk import chunk_delta_rule_torch
from megatron_refine.kernels.delta_rule.context_parallel import context_parallel_bytes, context_parallel_delta_rule
from megatron_refine.kernels.delta_rule.fla_path import (
    fla_available,
    fla_chunk_delta_rule,
    fla_chunk_gated_delta_rule,
    fla_states_after,
)
from megatron_refine.kernels.delta_rule.recurrent import delta_rule_step_torch, recurrent_delta_rule_torch
from megatron_refine.kernels.utils import check_finite, check_positions, check_rank, check_shape
from megatron_refine.kernels.varlen import ChunkLayout, check_cu_seqlens, packed_layout

__all__ = [
    "context_parallel_bytes",
    "context_parallel_delta_rule",
    "delta_rule",
    "delta_rule_step",
    "fla_available",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "recurrent_delta_rule",
    "recurrent_gated_delta_rule",
]


def _check(q, k, v, beta, initial_state, num_sequences: int | None = None, g=None) -> None:
    check_rank("q", q, 4, "[B, T, H, K]")
    check_rank("k", k, 4, "[B, T, H, K]")
    check_rank("v", v, 4, "[B, T, H, V]")
    check_rank("beta", beta, 3, "[B, T, H]")
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "[B, T, H, K]")
    if v.shape[:3] != (B, T, H):
        raise ValueError(
            f"v has shape {tuple(v.shape)}; its [B, T, H] must match q's {(B, T, H)} "
            "(same batch, length and number of heads)"
        )
    check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if initial_state is not None:
        N = B if num_sequences is None else num_sequences
        check_shape("initial_state", initial_state, (N, H, K, v.shape[-1]), "[N, H, K, V] (one per sequence)")
    check_finite("beta", beta)
    if g is not None:
        _check_gate(g, (B, T, H), "[B, T, H]")


def _check_gate(g, shape: tuple[int, ...], layout: str) -> None:
    check_rank("g", g, len(shape), layout)
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point log decay {layout}, got {g.dtype}")
    check_shape("g", g, shape, layout)
    check_finite("g", g)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    output_states_after: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_reference: bool = False,
):
    """The delta rule over whole sequences.

    Args:
        q, k: [B, T, H, K], L2-normalised over K.  v: [B, T, H, V].  beta: [B, T, H], in (0, 1) usually.
        scale: query scale, default K^-0.5.
        initial_state: [N, H, K, V] state before the first token of each sequence (N = B, or the packed count).
        output_final_state: also return the state after the last token of each sequence (fp32).
        chunk_size: chunk length of the PyTorch path (fla's kernel uses its own).
        output_states_after: also return `states_after`, a function of positions [B, P] (chosen after the
            forward, e.g. from its outputs) -> the states after those tokens [B, P, H, K, V] (fp32),
            differentiable w.r.t. k, v, beta and initial_state: on the PyTorch path read from this forward's
            chunk-start states plus the writes inside one chunk; on fla's kernel by the kernel chained over the
            prefix cut at the positions (`fla_path.py`). With cu_seqlens, positions index the packed time axis.
        cu_seqlens: [N + 1] packed sequence starts (inputs [1, total, ...]): the state restarts at each.
        use_reference: force the PyTorch path even where fla's kernel could run.

    Returns:
        (o [B, T, H, V], final_state [N, H, K, V] or None), plus `states_after` when `output_states_after`.
    """
    return _chunked(q, k, v, None, beta, scale, initial_state, output_final_state, chunk_size, output_states_after,
                    cu_seqlens, use_reference)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    output_states_after: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_reference: bool = False,
):
    """The gated delta rule over whole sequences: `delta_rule`'s arguments and returns, plus g [B, T, H], the
    log decay of the state before each token (<= 0; any float dtype, used in fp32, fp64 kept). `states_after` is
    differentiable w.r.t. g too. fla's kernel is `chunk_gated_delta_rule`."""
    return _chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, output_states_after,
                    cu_seqlens, use_reference)


def _chunked(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size, output_states_after,
             cu_seqlens, use_reference):
    """`delta_rule` (g None) and `gated_delta_rule`."""
    B, T = q.shape[:2]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    _check(q, k, v, beta, initial_state, None if cu_seqlens is None else cu_seqlens.numel() - 1, g)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not use_reference and fla_available(q):
        kernel, gates = (fla_chunk_delta_rule(), ()) if g is None else (fla_chunk_gated_delta_rule(), (g.float(),))
        o, final_state = kernel(
            q, k, v, *gates, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
        )
        if not output_states_after:
            return o, final_state
        reader = fla_states_after(k, v, beta, scale, initial_state, cu_seqlens, g)

        def states_after(positions: torch.Tensor) -> torch.Tensor:  # [B, P] -> [B, P, H, K, V]
            check_positions(positions, B, T)
            return reader(positions)

        return o, final_state, states_after
    if cu_seqlens is None:  # short rows (REFINE's k rollout tokens) get one chunk of their length, not a padded one
        layout = ChunkLayout.for_batch(B, T, min(chunk_size, T), q.device)
    else:
        layout = packed_layout(cu_seqlens, chunk_size)
    o, final_state, flat_states_after = chunk_delta_rule_torch(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), beta.flatten(0, 1), scale, layout,
        initial_state, output_final_state, output_states_after, None if g is None else g.flatten(0, 1),
    )
    o = o.view(B, T, *o.shape[1:])
    if not output_states_after:
        return o, final_state

    def states_after(positions: torch.Tensor) -> torch.Tensor:  # [B, P] -> [B, P, H, K, V]
        check_positions(positions, B, T)
        states = flat_states_after((positions + torch.arange(B, device=positions.device)[:, None] * T).flatten())
        return states.view(B, -1, *states.shape[1:])

    return o, final_state, states_after


def delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: q, k [B, H, K], v [B, H, V], beta [B, H], state [B, H, K, V] -> (o [B, H, V], state)."""
    return _step(q, k, v, None, beta, state, scale)


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the gated rule: `delta_rule_step` with g [B, H], the log decay before the token."""
    return _step(q, k, v, g, beta, state, scale)


def _step(q, k, v, g, beta, state, scale):
    check_rank("q", q, 3, "[B, H, K]")
    check_rank("state", state, 4, "[B, H, K, V]")
    B, H, K = q.shape
    check_shape("k", k, (B, H, K), "[B, H, K]")
    check_shape("beta", beta, (B, H), "[B, H]")
    check_shape("state", state, (B, H, K, v.shape[-1]), "[B, H, K, V]")
    check_finite("beta", beta)
    if g is not None:
        _check_gate(g, (B, H), "[B, H]")
    o, state = delta_rule_step_torch(q, k, v, beta, state, K**-0.5 if scale is None else scale, g)
    return o.to(v.dtype), state


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`delta_rule_step` looped over T (same contract as `delta_rule`): the token-by-token baseline."""
    _check(q, k, v, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return recurrent_delta_rule_torch(q, k, v, beta, scale, initial_state, output_final_state)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gated_delta_rule_step` looped over T (same contract as `gated_delta_rule`): the token-by-token baseline."""
    _check(q, k, v, beta, initial_state, g=g)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return recurrent_delta_rule_torch(q, k, v, beta, scale, initial_state, output_final_state, g)
