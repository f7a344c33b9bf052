"""Chunked delta rule in PyTorch (the WY / UT-transform algorithm), fp32, differentiable end to end.

Within a chunk of C tokens with start state S (per head, [K, V]) the delta rule
    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,      o_t = S_t^T (scale * q_t)
unrolls to U = (I + L)^{-1} (diag(beta) V - diag(beta) K S) with L = strictly_lower(diag(beta) K K^T):
the rows of U are the "new values" each token writes. With T = (I + L)^{-1} (one triangular solve),
w = T diag(beta) K and u = T diag(beta) V, so per chunk only three small matmuls depend on S:
    U = u - w S,    O = (scale Q) S + tril(scale Q K^T) U,    S' = S + K^T U.
The state after any token r of the chunk is S + K[:r+1]^T U[:r+1]: that is how `states_at` reads the
state after arbitrary positions from the chunk-start states, without re-running any prefix.
"""

from __future__ import annotations

import torch

from megatron_refine.kernels.utils import compute_dtype, pad_time


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    states_at: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] -> (o [B, T, H, V], final [B, H, K, V], states [B, P, H, K, V]).

    Accumulates in fp32 (fp64 inputs stay fp64); o is returned in v's dtype, the states in fp32.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype, acc = v.dtype, compute_dtype(v)
    # Zero padding is exact: a padded token has k = 0 and beta = 0, so it writes nothing.
    q, k, v, beta = (pad_time(x.to(acc), C) for x in (q, k, v, beta))
    N = q.shape[1] // C

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, N*C, H, D] -> [B, H, N, C, D]
        return x.view(B, N, C, H, -1).permute(0, 3, 1, 2, 4)

    q, k, v = chunks(q) * scale, chunks(k), chunks(v)
    beta = beta.view(B, N, C, H).permute(0, 3, 1, 2).unsqueeze(-1)  # [B, H, N, C, 1]
    k_beta, v_beta = k * beta, v * beta
    strictly_lower = (k_beta @ k.transpose(-1, -2)).tril(-1)  # [B, H, N, C, C]
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand_as(strictly_lower)
    T_inv = torch.linalg.solve_triangular(strictly_lower, eye, upper=False, unitriangular=True)
    w, u = T_inv @ k_beta, T_inv @ v_beta  # [B, H, N, C, K], [B, H, N, C, V]
    qk = (q @ k.transpose(-1, -2)).tril()  # [B, H, N, C, C], causal including the diagonal

    wanted_chunks: set[int] = set()
    if states_at is not None:
        wanted_chunks = set((states_at // C).unique().tolist())
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs, new_values, chunk_starts = [], [], {}
    for n in range(N):
        if n in wanted_chunks:
            chunk_starts[n] = S
        U = u[:, :, n] - w[:, :, n] @ S  # [B, H, C, V]
        outputs.append(q[:, :, n] @ S + qk[:, :, n] @ U)
        new_values.append(U)
        if n < N - 1 or output_final_state:
            S = S + k[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outputs, dim=3)  # [B, H, C, N, V] -> [B, N*C, H, V]
    o = o.permute(0, 3, 2, 1, 4).reshape(B, N * C, H, V)[:, :T].to(out_dtype)

    states = None
    if states_at is not None:
        states = _states_after(states_at, chunk_starts, k, torch.stack(new_values, dim=2), C)
    return o, (S if output_final_state else None), states


def _states_after(
    positions: torch.Tensor,  # [B, P]
    chunk_starts: dict[int, torch.Tensor],  # chunk index -> start state [B, H, K, V]
    k: torch.Tensor,  # [B, H, N, C, K]
    new_values: torch.Tensor,  # [B, H, N, C, V]
    C: int,
) -> torch.Tensor:
    """State after each position: its chunk's start state plus the writes of the chunk's tokens up to it."""
    order = sorted(chunk_starts)
    starts = torch.stack([chunk_starts[n] for n in order], dim=2)  # [B, H, M, K, V]
    slot_of_chunk = torch.full((k.shape[2],), -1, dtype=torch.long, device=positions.device)
    slot_of_chunk[torch.tensor(order, device=positions.device)] = torch.arange(len(order), device=positions.device)
    chunk, offset = positions // C, positions % C
    b = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]
    S0 = starts[b, :, slot_of_chunk[chunk]]  # [B, P, H, K, V]
    k_sel, u_sel = k[b, :, chunk], new_values[b, :, chunk]  # [B, P, H, C, K], [B, P, H, C, V]
    upto = (torch.arange(C, device=positions.device) <= offset[..., None])[:, :, None, :, None]  # [B, P, 1, C, 1]
    return S0 + (k_sel * upto).transpose(-1, -2) @ u_sel
