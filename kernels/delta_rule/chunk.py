"""Chunked delta rule in PyTorch (the WY / UT-transform algorithm), fp32, differentiable end to end.

Within a chunk of C tokens with start state S (per head, [K, V]) the delta rule
    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,      o_t = S_t^T (scale * q_t)
unrolls to U = (I + L)^{-1} (diag(beta) V - diag(beta) K S) with L = strictly_lower(diag(beta) K K^T):
the rows of U are the "new values" each token writes. With T = (I + L)^{-1} (one triangular solve),
w = T diag(beta) K and u = T diag(beta) V, so per chunk only three small matmuls depend on S:
    U = u - w S,    O = (scale Q) S + tril(scale Q K^T) U,    S' = S + K^T U.
The state after any token r of the chunk is S + K[:r+1]^T U[:r+1]: that is how `states_after` reads the
state after arbitrary positions, chosen after the forward, from the chunk-start states and new values the
forward made (the tensors autograd saves for its backward anyway), without re-running any prefix.

Sequences are packed (`ChunkLayout`): each one's chunks start at its own first token and its recurrence
starts from its own initial state, so a packed batch computes exactly what separate runs would.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.kernels.varlen import ChunkLayout


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    layout: ChunkLayout,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_states_after: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Packed q, k [total, H, K], v [total, H, V], beta [total, H] cut into chunks by `layout`
    -> (o [total, H, V], final [N, H, K, V], states_after: token indices [P] -> states [P, H, K, V]).
    Reads no tensor on the host.

    Accumulates in fp32 (fp64 inputs stay fp64); o is returned in v's dtype, the states in fp32.
    """
    total, H, K = q.shape
    V = v.shape[-1]
    out_dtype, acc = v.dtype, compute_dtype(v)
    chunk_size = layout.chunk_size
    # Slots past a sequence's end are zeros: k = 0 and beta = 0 write nothing, so the padding is exact.
    heads_first = lambda x: layout.gather(x.to(acc)).transpose(1, 2)  # noqa: E731  [pairs, C, H, D] -> [pairs, H, C, D]
    q, k, v = heads_first(q) * scale, heads_first(k), heads_first(v)
    beta = heads_first(beta[..., None])  # [pairs, H, C, 1]
    k_beta, v_beta = k * beta, v * beta
    strictly_lower = (k_beta @ k.transpose(-1, -2)).tril(-1)  # [pairs, H, C, C]
    eye = torch.eye(chunk_size, dtype=acc, device=q.device).expand_as(strictly_lower)
    T_inv = torch.linalg.solve_triangular(strictly_lower, eye, upper=False, unitriangular=True)
    w, u = T_inv @ k_beta, T_inv @ v_beta  # [pairs, H, C, K], [pairs, H, C, V]
    qk = (q @ k.transpose(-1, -2)).tril()  # [pairs, H, C, C], causal including the diagonal

    N = layout.num_sequences
    if initial_state is None:
        S = q.new_zeros(N, H, K, V)
    else:
        S = initial_state.to(acc)
        if layout.uniform_length is None:  # a batch's layout order is the batch order
            S = S[layout.order]
    outputs, new_values, chunk_starts = [], [], []
    # Chunk j's pairs are rows offsets[j] .. + active[j]: one split (whose backward is one concatenation) instead of
    # a slice per chunk, whose backward would zero-fill the whole tensor for every chunk.
    per_chunk = (x.split(layout.active) for x in (q, k, u, w, qk))
    for j, (m, q_j, k_j, u_j, w_j, qk_j) in enumerate(zip(layout.active, *per_chunk)):
        S_run = S[:m]  # the m sequences still running
        if output_states_after:  # every chunk's, in pair order: which chunks the positions need is data
            chunk_starts.append(S_run)
        U = u_j - w_j @ S_run  # [m, H, C, V]
        outputs.append(q_j @ S_run + qk_j @ U)
        if output_states_after:
            new_values.append(U)
        if j < len(layout.active) - 1 or output_final_state:
            S_run = S_run + k_j.transpose(-1, -2) @ U
            S = S_run if m == N else torch.cat([S_run, S[m:]])
    o = layout.scatter(torch.cat(outputs).transpose(1, 2), total).to(out_dtype)

    final = None
    if output_final_state:
        final = S if layout.uniform_length is not None else S[layout.rank]
    states_after = functools.partial(_states_after, layout, chunk_starts, k, new_values) if output_states_after else None
    return o, final, states_after


def _states_after(
    layout: ChunkLayout,
    chunk_starts: list[torch.Tensor],  # per chunk j [active[j], H, K, V]: the state each (sequence, chunk) pair starts from
    k: torch.Tensor,  # [pairs, H, C, K]
    new_values: list[torch.Tensor],  # per chunk j [active[j], H, C, V]
    positions: torch.Tensor,  # [P] token indices
) -> torch.Tensor:
    """State after each position [P, H, K, V]: its chunk's start state plus the writes of the chunk's tokens up to
    it. The forward keeps the chunk lists (autograd holds them for its backward anyway); concatenating them here
    is transient, and what stays in the graph is P states."""
    _, _, offset, pair = layout.locate(positions)
    slots = torch.arange(layout.chunk_size, device=positions.device)
    upto = (slots <= offset[:, None])[:, None, :, None]  # [P, 1, C, 1]
    # index_select: its backward (index_add_) costs a third of advanced indexing's (index_put_) on CPU
    pick = lambda x: x.index_select(0, pair)  # noqa: E731
    return pick(torch.cat(chunk_starts)) + (pick(k) * upto).transpose(-1, -2) @ pick(torch.cat(new_values))
