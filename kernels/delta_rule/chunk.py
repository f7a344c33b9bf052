"""Chunked delta rule in PyTorch (the WY / UT-transform algorithm), fp32, differentiable end to end.

Within a chunk of C tokens with start state S (per head, [K, V]) the delta rule
    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,      o_t = S_t^T (scale * q_t)
unrolls to U = (I + L)^{-1} (diag(beta) V - diag(beta) K S) with L = strictly_lower(diag(beta) K K^T):
the rows of U are the "new values" each token writes. With T = (I + L)^{-1} (one triangular solve),
w = T diag(beta) K and u = T diag(beta) V, so per chunk only three small matmuls depend on S:
    U = u - w S,    O = (scale Q) S + tril(scale Q K^T) U,    S' = S + K^T U.
The state after any token r of the chunk is S + K[:r+1]^T U[:r+1]: that is how `states_at` reads the
state after arbitrary positions from the chunk-start states, without re-running any prefix.

Sequences are packed (`ChunkLayout`): each one's chunks start at its own first token and its recurrence
starts from its own initial state, so a packed batch computes exactly what separate runs would.
"""

from __future__ import annotations

import torch

from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.kernels.varlen import ChunkLayout


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    states_at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Packed q, k [total, H, K], v [total, H, V], beta [total, H], cu_seqlens [N + 1], states_at [P]
    -> (o [total, H, V], final [N, H, K, V], states [P, H, K, V]).

    Accumulates in fp32 (fp64 inputs stay fp64); o is returned in v's dtype, the states in fp32.
    """
    total, H, K = q.shape
    V = v.shape[-1]
    out_dtype, acc = v.dtype, compute_dtype(v)
    layout = ChunkLayout.build(cu_seqlens, chunk_size)
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
        S = initial_state.to(acc)[layout.order]  # sequences in layout order
    wanted = set() if states_at is None else set(layout.locate(states_at)[1].unique().tolist())
    outputs, new_values, chunk_starts = [], [], {}
    for j, (m, first) in enumerate(zip(layout.active, layout.offsets)):
        rows, S_run = slice(first, first + m), S[:m]  # the m sequences still running
        if j in wanted:
            chunk_starts[j] = S_run
        U = u[rows] - w[rows] @ S_run  # [m, H, C, V]
        outputs.append(q[rows] @ S_run + qk[rows] @ U)
        new_values.append(U)
        if j < len(layout.active) - 1 or output_final_state:
            S_run = S_run + k[rows].transpose(-1, -2) @ U
            S = S_run if m == N else torch.cat([S_run, S[m:]])
    o = layout.scatter(torch.cat(outputs).transpose(1, 2), total).to(out_dtype)

    states = None
    if states_at is not None:
        states = _states_after(layout, states_at, chunk_starts, k, torch.cat(new_values))
    return o, (S[layout.rank] if output_final_state else None), states


def _states_after(
    layout: ChunkLayout,
    positions: torch.Tensor,  # [P] token indices
    chunk_starts: dict[int, torch.Tensor],  # chunk j -> start states of the sequences running at j [m_j, H, K, V]
    k: torch.Tensor,  # [pairs, H, C, K]
    new_values: torch.Tensor,  # [pairs, H, C, V]
) -> torch.Tensor:
    """State after each position: its chunk's start state plus the writes of the chunk's tokens up to it."""
    order = sorted(chunk_starts)
    base = torch.zeros(len(layout.active), dtype=torch.long, device=positions.device)
    sizes = [chunk_starts[j].shape[0] for j in order]
    base[torch.tensor(order, device=positions.device)] = torch.tensor(
        [sum(sizes[:i]) for i in range(len(order))], device=positions.device)
    starts = torch.cat([chunk_starts[j] for j in order])  # [sum m_j, H, K, V]
    rank, chunk, offset, pair = layout.locate(positions)
    S0 = starts[base[chunk] + rank]  # [P, H, K, V]
    C = layout.chunk_size
    upto = (torch.arange(C, device=positions.device) <= offset[:, None])[:, None, :, None]  # [P, 1, C, 1]
    return S0 + (k[pair] * upto).transpose(-1, -2) @ new_values[pair]
