"""Chunked delta rule in PyTorch (the WY / UT-transform algorithm), fp32, differentiable end to end.

Within a chunk of C tokens with start state S (per head, [K, V]) the delta rule
    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,      o_t = S_t^T (scale * q_t)
unrolls to U = (I + L)^{-1} (diag(beta) V - diag(beta) K S) with L = strictly_lower(diag(beta) K K^T):
the rows of U are the "new values" each token writes. With T = (I + L)^{-1} (one triangular solve),
w = T diag(beta) K and u = T diag(beta) V, so per chunk only three small matmuls depend on S:
    U = u - w S,    O = (scale Q) S + tril(scale Q K^T) U,    S' = S + K^T U.
The backward is written out by hand (`_ChunkDeltaRule`); gradients equal autograd's through the same lines.
The state after any token r of the chunk is S + K[:r+1]^T U[:r+1]: that is how `states_after` reads the
state after arbitrary positions, chosen after the forward, from the chunk-start states and new values the
forward made (tensors its backward saves anyway), without re-running any prefix.

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
    out_dtype, acc = v.dtype, compute_dtype(v)
    # Slots past a sequence's end are zeros: k = 0 and beta = 0 write nothing, so the padding is exact.
    # [pairs, C, H, D] -> [pairs, H, C, D], contiguous: every matmul would otherwise copy its operand
    heads_first = lambda x: layout.gather(x.to(acc)).transpose(1, 2).contiguous()  # noqa: E731
    N = layout.num_sequences
    if initial_state is None:
        S0 = q.new_zeros(N, H, K, v.shape[-1], dtype=acc)
    else:
        S0 = initial_state.to(acc)
        if layout.uniform_length is None:  # a batch's layout order is the batch order
            S0 = S0[layout.order]
    k = heads_first(k)
    o, S, chunk_starts, new_values = _ChunkDeltaRule.apply(
        heads_first(q), k, heads_first(v), heads_first(beta[..., None]), S0, scale, layout, output_final_state,
    )
    o = layout.scatter(o.transpose(1, 2), total).to(out_dtype)

    final = None
    if output_final_state:
        final = S if layout.uniform_length is not None else S[layout.rank]
    if not output_states_after:
        return o, final, None
    return o, final, functools.partial(_states_after, layout, chunk_starts, k, new_values)


class _ChunkDeltaRule(torch.autograd.Function):
    """Every chunk at once, with its backward written out (as fla's kernels do): autograd through these few
    lines would record a dozen batched matmuls, masks, a triangular solve and a loop of small matmuls, and
    accumulate their gradients piece by piece; here the backward is about twice the forward's matmuls and
    little else.

    Only two matmuls per chunk are sequential: U_j = u_j - w_j S_j and S_{j+1} = S_j + k_j^T U_j (chunk j's
    pairs are rows offsets[j] .. + active[j]; the first active[j] sequences of the layout order run there).
    Everything else is one batched matmul over all pairs.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, S0, scale: float, layout: ChunkLayout, output_final_state: bool):
        # q, k [pairs, H, C, K]; v [pairs, H, C, V]; beta [pairs, H, C, 1]; S0 [N, H, K, V] in layout order
        C = k.shape[-2]
        causal, strict = _triangles(k)
        q, k_beta, v_beta = q * scale, k * beta, v * beta
        L = (k_beta @ k.transpose(-1, -2)) * strict  # strictly lower diag(beta) K K^T
        # T = (I + L)^{-1}, as X (I + L) = I: the right-sided solve is the faster one on row-major batches
        T = torch.linalg.solve_triangular(L, torch.eye(C, dtype=q.dtype, device=q.device).expand_as(L), upper=False,
                                          left=False, unitriangular=True)
        w, u = T @ k_beta, T @ v_beta  # [pairs, H, C, K], [pairs, H, C, V]
        P = (q @ k.transpose(-1, -2)) * causal  # [pairs, H, C, C]

        S = S0.clone()
        starts = q.new_empty(*q.shape[:2], *S.shape[2:])  # [pairs, H, K, V]: the state each pair starts from
        U = torch.empty_like(u)  # [pairs, H, C, V]: the new values each token writes
        last = len(layout.active) - 1
        for j, (m, first) in enumerate(zip(layout.active, layout.offsets)):
            rows = slice(first, first + m)
            starts[rows] = S[:m]
            U[rows] = u[rows] - w[rows] @ S[:m]
            if j < last or output_final_state:
                S[:m] += k[rows].transpose(-1, -2) @ U[rows]
        o = q @ starts
        o += P @ U
        ctx.save_for_backward(q, k, v, beta, k_beta, v_beta, T, w, P, starts, U)
        ctx.scale, ctx.layout, ctx.output_final_state = scale, layout, output_final_state
        ctx.set_materialize_grads(False)  # outputs nobody used get None, not zeros to add
        return o, S, starts, U

    @staticmethod
    def backward(ctx, d_o, d_S, d_starts, d_U):
        q, k, v, beta, k_beta, v_beta, T, w, P, starts, U = ctx.saved_tensors
        layout = ctx.layout
        causal, strict = _triangles(k)
        # d_o arrives transposed: one copy here, not one per matmul
        d_o = torch.zeros_like(U) if d_o is None else d_o.contiguous()
        dU = P.transpose(-1, -2) @ d_o  # [pairs, H, C, V], completed in the loop
        if d_U is not None:
            dU += d_U
        d_start = q.transpose(-1, -2) @ d_o  # [pairs, H, K, V]: what each chunk start gets from the outputs
        if d_starts is not None:
            d_start += d_starts
        if d_S is None or not ctx.output_final_state:
            dS = torch.zeros_like(starts[: layout.num_sequences])
        else:
            dS = d_S.clone()
        d_after = torch.zeros_like(starts)  # [pairs, H, K, V]: the gradient of the state after each pair
        last = len(layout.active) - 1
        for j in range(last, -1, -1):  # dS holds the gradient of the state after chunk j
            m, first = layout.active[j], layout.offsets[j]
            rows = slice(first, first + m)
            if j < last or ctx.output_final_state:
                d_after[rows] = dS[:m]
                dU[rows] += k[rows] @ dS[:m]
            dS[:m] += d_start[rows] - w[rows].transpose(-1, -2) @ dU[rows]

        dP = (d_o @ U.transpose(-1, -2)) * causal
        dq = d_o @ starts.transpose(-1, -2)
        dq += dP @ k
        dk = dP.transpose(-1, -2) @ q
        dk += U @ d_after.transpose(-1, -2)
        # U = u - w S = T (v_beta - k_beta S): with dw = -dU S^T and du = dU, through w = T k_beta, u = T v_beta
        G = T.transpose(-1, -2) @ dU
        dT = dU @ (v_beta - k_beta @ starts).transpose(-1, -2)  # [pairs, H, C, C]
        dL = (T.transpose(-1, -2) @ dT @ T.transpose(-1, -2)).mul_(-strict)  # d (I + L)^{-1} = -T dL T
        d_k_beta = dL @ k
        d_k_beta -= G @ starts.transpose(-1, -2)
        dk += dL.transpose(-1, -2) @ k_beta
        dk += d_k_beta * beta
        dv = G * beta
        d_beta = (d_k_beta * k).sum(-1, keepdim=True) + (G * v).sum(-1, keepdim=True)
        return dq * ctx.scale, dk, dv, d_beta, dS, None, None, None


def _triangles(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal (diagonal included) and strictly lower 0/1 masks [C, C] of k's chunks [.., C, K], to multiply by:
    on CPU `tril` is a slow elementwise loop."""
    C = k.shape[-2]
    causal = torch.ones(C, C, dtype=k.dtype, device=k.device).tril()
    return causal, causal - torch.eye(C, dtype=k.dtype, device=k.device)


def _states_after(
    layout: ChunkLayout,
    chunk_starts: torch.Tensor,  # [pairs, H, K, V] the state each (sequence, chunk) pair starts from
    k: torch.Tensor,  # [pairs, H, C, K]
    new_values: torch.Tensor,  # [pairs, H, C, V]
    positions: torch.Tensor,  # [P] token indices
) -> torch.Tensor:
    """State after each position [P, H, K, V]: its chunk's start state plus the writes of the chunk's tokens up to
    it. Nothing is kept for this beyond what the backward saves anyway; what it adds to the graph is P states."""
    _, _, offset, pair = layout.locate(positions)
    slots = torch.arange(layout.chunk_size, device=positions.device)
    upto = (slots <= offset[:, None])[:, None, :, None]  # [P, 1, C, 1]
    # index_select: its backward (index_add_) costs a third of advanced indexing's (index_put_) on CPU
    pick = lambda x: x.index_select(0, pair)  # noqa: E731
    return pick(chunk_starts) + (pick(k) * upto).transpose(-1, -2) @ pick(new_values)
