"""Chunked (gated) delta rule in PyTorch (the WY / UT-transform algorithm), fp32, differentiable end to end.

Within a chunk of C tokens with start state S (per head, [K, V]) the gated delta rule
    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,      o_t = S_t^T (scale * q_t)
with a_t = exp(g_t) (DeltaNet: g = 0) unrolls with the cumulative log decay G_t = g_1 + .. + g_t of the chunk
and D_ts = exp(G_t - G_s) (t >= s: every factor is <= 1, nothing is divided by a decay) to
    U = (I + L)^{-1} (diag(beta) V - diag(beta exp(G)) K S),   L = strictly_lower(diag(beta) K K^T * D):
the rows of U are the "new values" each token writes. With T = (I + L)^{-1} (one triangular solve),
w = T diag(beta exp(G)) K and u = T diag(beta) V, so per chunk only three small matmuls depend on S:
    U = u - w S,    O = (scale Q exp(G)) S + (tril(scale Q K^T) * D) U,    S' = exp(G_C) S + (K exp(G_C - G))^T U.
With g = None (DeltaNet) every decay factor is 1 and none is computed.
The backward is written out by hand (`_ChunkDeltaRule`); gradients equal autograd's through the same lines.
The state after any token r of the chunk is exp(G_r) S + (K[:r+1] exp(G_r - G[:r+1]))^T U[:r+1]: that is how
`states_after` reads the state after arbitrary positions, chosen after the forward, from the chunk-start states
and new values the forward made (tensors its backward saves anyway), without re-running any prefix.

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
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]:
    """Packed q, k [total, H, K], v [total, H, V], beta [total, H] (and log decays g [total, H], gated; None:
    DeltaNet) cut into chunks by `layout`
    -> (o [total, H, V], final [N, H, K, V], states_after: token indices [P] -> states [P, H, K, V]).
    Reads no tensor on the host.

    Accumulates in fp32 (fp64 inputs stay fp64); o is returned in v's dtype, the states in fp32.
    """
    total, H, K = q.shape
    out_dtype, acc = v.dtype, compute_dtype(v)
    # Slots past a sequence's end are zeros: k = 0 and beta = 0 write nothing and g = 0 decays nothing, so the
    # padding is exact.
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
    # [pairs, H, C, 1]: the cumulative log decay from each chunk's start (autograd differentiates the cumsum)
    G = None if g is None else heads_first(g[..., None]).cumsum(-2)
    o, S, chunk_starts, new_values = _ChunkDeltaRule.apply(
        heads_first(q), k, heads_first(v), heads_first(beta[..., None]), G, S0, scale, layout, output_final_state,
    )
    o = layout.scatter(o.transpose(1, 2), total).to(out_dtype)

    final = None
    if output_final_state:
        final = S if layout.uniform_length is not None else S[layout.rank]
    if not output_states_after:
        return o, final, None
    return o, final, functools.partial(_states_after, layout, chunk_starts, k, new_values, G)


class _ChunkDeltaRule(torch.autograd.Function):
    """Every chunk at once, with its backward written out (as fla's kernels do): autograd through these few
    lines would record a dozen batched matmuls, masks, a triangular solve and a loop of small matmuls, and
    accumulate their gradients piece by piece; here the backward is about twice the forward's matmuls and
    little else. The decays (G given) scale operands elementwise and add no matmul.

    Only two matmuls per chunk are sequential: U_j = u_j - w_j S_j and S_{j+1} = exp(G_C) S_j + k_end_j^T U_j
    (chunk j's pairs are rows offsets[j] .. + active[j]; the first active[j] sequences of the layout order run
    there). Everything else is one batched matmul over all pairs.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, G, S0, scale: float, layout: ChunkLayout, output_final_state: bool):
        # q, k [pairs, H, C, K]; v [pairs, H, C, V]; beta [pairs, H, C, 1]; S0 [N, H, K, V] in layout order;
        # G [pairs, H, C, 1] cumulative log decays, or None (no decay: DeltaNet)
        C = k.shape[-2]
        causal, strict = _triangles(k)
        q, k_beta, v_beta = q * scale, k * beta, v * beta
        # masks multiply the fresh matmul results in place: a new [pairs, H, C, C] tensor costs page faults on CPU
        L = (k_beta @ k.transpose(-1, -2)).mul_(strict)  # strictly lower diag(beta) K K^T (* D)
        decays = _Decays.of(G, causal)
        if decays is not None:
            L *= decays.D
        # T = (I + L)^{-1}, as X (I + L) = I: the right-sided solve is the faster one on row-major batches
        T = torch.linalg.solve_triangular(L, torch.eye(C, dtype=q.dtype, device=q.device).expand_as(L), upper=False,
                                          left=False, unitriangular=True)
        # the queries and keys that read the chunk's start state, and the keys that write its end state
        q_start, kb_start, k_end = (q, k_beta, k) if decays is None else decays.scale(q, k_beta, k)
        w, u = T @ kb_start, T @ v_beta  # [pairs, H, C, K], [pairs, H, C, V]
        P = (q @ k.transpose(-1, -2)).mul_(causal if decays is None else decays.D)  # [pairs, H, C, C]

        S = S0.clone()
        starts = q.new_empty(*q.shape[:2], *S.shape[2:])  # [pairs, H, K, V]: the state each pair starts from
        U = torch.empty_like(u)  # [pairs, H, C, V]: the new values each token writes
        last = len(layout.active) - 1
        for j, (m, first) in enumerate(zip(layout.active, layout.offsets)):
            rows = slice(first, first + m)
            starts[rows] = S[:m]
            U[rows] = u[rows] - w[rows] @ S[:m]
            if j < last or output_final_state:
                if decays is not None:
                    S[:m] *= decays.chunk[rows]
                S[:m] += k_end[rows].transpose(-1, -2) @ U[rows]
        o = q_start @ starts
        o += P @ U
        gated = () if decays is None else (decays.D, decays.A, decays.to_end)
        ctx.save_for_backward(q, k, v, beta, k_beta, v_beta, T, w, P, starts, U, q_start, kb_start, k_end, *gated)
        ctx.scale, ctx.layout, ctx.output_final_state = scale, layout, output_final_state
        ctx.set_materialize_grads(False)  # outputs nobody used get None, not zeros to add
        return o, S, starts, U

    @staticmethod
    def backward(ctx, d_o, d_S, d_starts, d_U):
        q, k, v, beta, k_beta, v_beta, T, w, P, starts, U, q_start, kb_start, k_end, *gated = ctx.saved_tensors
        layout = ctx.layout
        causal, strict = _triangles(k)
        decays = _Decays(*gated) if gated else None
        # d_o arrives transposed: one copy here, not one per matmul
        d_o = torch.zeros_like(U) if d_o is None else d_o.contiguous()
        dU = P.transpose(-1, -2) @ d_o  # [pairs, H, C, V], completed in the loop
        if d_U is not None:
            dU += d_U
        d_start = q_start.transpose(-1, -2) @ d_o  # [pairs, H, K, V]: what each chunk start gets from the outputs
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
                dU[rows] += k_end[rows] @ dS[:m]
                if decays is not None:
                    dS[:m] *= decays.chunk[rows]
            dS[:m] += d_start[rows] - w[rows].transpose(-1, -2) @ dU[rows]

        dP = d_o @ U.transpose(-1, -2)  # [pairs, H, C, C], masked (and decayed) below
        d_q_start = d_o @ starts.transpose(-1, -2)
        d_k_end = U @ d_after.transpose(-1, -2)
        # U = u - w S = T Y, Y = v_beta - kb_start S: with dw = -dU S^T and du = dU, through w = T kb_start,
        # u = T v_beta; dY = T^T dU
        dY = T.transpose(-1, -2) @ dU
        dT = dU @ (v_beta - kb_start @ starts).transpose(-1, -2)  # [pairs, H, C, C]
        dL = (T.transpose(-1, -2) @ dT @ T.transpose(-1, -2)).mul_(-strict)  # d (I + L)^{-1} = -T dL T
        minus_d_kb_start = dY @ starts.transpose(-1, -2)
        if decays is None:
            dP *= causal
            dq, dk = d_q_start, d_k_end
        else:
            dP *= decays.D
            dL *= decays.D
            written = _rowdot(d_k_end, k_end)  # [pairs, H, C]: the gradient of (G_C - G_t) through k_end
            # through the scalings of `_Decays.scale`, in place
            dq, dk = d_q_start.mul_(decays.A), d_k_end.mul_(decays.to_end)
            minus_d_kb_start.mul_(decays.A)
        dq += dP @ k
        dk += dP.transpose(-1, -2) @ q
        d_k_beta = dL @ k
        d_k_beta -= minus_d_kb_start
        dk += dL.transpose(-1, -2) @ k_beta
        dk += d_k_beta * beta
        dv = dY * beta
        d_k_beta_k = (d_k_beta * k).sum(-1, keepdim=True)
        d_beta = d_k_beta_k + (dY * v).sum(-1, keepdim=True)
        dG = None
        if decays is not None:
            dG = decays.backward(q, dq, k, dk, beta * d_k_beta_k, written, starts, d_after)
        return dq * ctx.scale, dk, dv, d_beta, dG, dS, None, None, None


class _Decays:
    """The decay factors of chunks with cumulative log decays G [pairs, H, C, 1] (from each chunk's start):
    D_ts = exp(G_t - G_s) for t >= s [pairs, H, C, C], A = exp(G) (from the chunk's start to each token),
    to_end = exp(G_C - G) (from each token to the chunk's end), chunk = exp(G_C) [pairs, H, 1, 1]. Every
    exponent is <= 0 when g <= 0: nothing is divided by a decay, which underflows over long chunks."""

    def __init__(self, D: torch.Tensor, A: torch.Tensor, to_end: torch.Tensor):
        self.D, self.A, self.to_end = D, A, to_end
        self.chunk = A[..., -1:, :]

    @classmethod
    def of(cls, G: torch.Tensor | None, causal: torch.Tensor) -> "_Decays | None":
        if G is None:
            return None
        # masked before exp: above the diagonal G_t - G_s > 0 could overflow (and inf * 0 is NaN)
        D = (G - G.transpose(-1, -2)).mul_(causal).exp_().mul_(causal)
        return cls(D, G.exp(), torch.exp(G[..., -1:, :] - G))

    def scale(self, q, k_beta, k):
        """Queries reading the chunk's start state, keys reading it (through w), keys writing its end state."""
        return q * self.A, k_beta * self.A, k * self.to_end

    def backward(self, q, dq, k, dk, k_beta_dot, written, starts, d_after):
        """dG [pairs, H, C, 1] from the inputs' gradients, as fla's kernels get it. Every factor exp(G_t - ..) of
        the chunk multiplies a row that belongs to token t: q_t (in D and A), k_beta_t (in D and A); every
        exp(.. - G_t) a key k_t (in D and to_end). Scaling an input by exp(x) changes the loss by its value
        times its gradient, so dG_t = q_t . dq_t - k_t . dk_t + 2 k_beta_t . dk_beta_t (k_t's gradient holds
        k_beta_t's, the other way round), k_beta_dot [pairs, H, C, 1] that last dot product; plus, at the
        chunk's last slot, G_C's: through to_end (`written` [pairs, H, C], per token) and the decay of the
        start state, S' = exp(G_C) S + ..
        q, dq (the scaled queries and theirs), k, dk: [pairs, H, C, K]; starts, d_after: [pairs, H, K, V]."""
        dG = _rowdot(q, dq) - _rowdot(k, dk) + 2 * k_beta_dot[..., 0]  # [pairs, H, C]
        dG[..., -1] += written.sum(-1) + (starts * d_after).sum((-1, -2)) * self.chunk[..., 0, 0]
        return dG[..., None]


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[.., C, K] x [.., C, K] -> [.., C]: an einsum, one pass (a product tensor is a fresh allocation, page
    faults on CPU)."""
    return torch.einsum("...tk,...tk->...t", x, y)


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
    G: torch.Tensor | None,  # [pairs, H, C, 1] cumulative log decays (None: no decay)
    positions: torch.Tensor,  # [P] token indices
) -> torch.Tensor:
    """State after each position [P, H, K, V]: its chunk's start state plus the writes of the chunk's tokens up to
    it (decayed to it). Nothing is kept for this beyond what the backward saves anyway; what it adds to the graph
    is P states."""
    _, _, offset, pair = layout.locate(positions)
    slots = torch.arange(layout.chunk_size, device=positions.device)
    upto = (slots <= offset[:, None])[:, None, :, None]  # [P, 1, C, 1]
    # index_select: its backward (index_add_) costs a third of advanced indexing's (index_put_) on CPU
    pick = lambda x: x.index_select(0, pair)  # noqa: E731
    start, keys = pick(chunk_starts), pick(k) * upto
    if G is not None:
        G = pick(G)
        G_r = G.gather(-2, offset.view(-1, 1, 1, 1).expand(-1, G.shape[1], 1, 1))  # [P, H, 1, 1]
        start = start * G_r.exp()
        keys = keys * torch.exp((G_r - G) * upto)  # masked before exp: exp(G_r - G_s) for s <= r only
    return start + keys.transpose(-1, -2) @ pick(new_values)
