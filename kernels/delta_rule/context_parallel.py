"""Context parallelism for the (gated) delta rule by state passing: each rank of a process group holds a
contiguous piece of the sequence(s) and passes the state across piece boundaries.

Over a piece, the state of every row is affine in the state S_in the piece starts from (per head):
    S_out = P S_in + N,    P [K, K] = prod_t a_t (I - beta_t k_t k_t^T),    N [K, V] (the piece from S_in = 0),
since S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T acts on each column of the state alone. So one
pass of the chunked kernel with values [0 | v] (width K + V) from the state [I | 0] carries [P_t | N_t] to every
token t of the piece: its final state gives the piece's (P, N); its outputs give q's share through P
(o'_t[:K] = P_t^T scale q_t) next to the outputs from a zero state (o'_t[K:]). The ranks all-gather their
(P, N) in fp32 (as fla's CP keeps its chain: fla #740), each folds S_in(r) = fold over pieces j < r of
S <- P_j S + N_j from S = 0, and corrects its outputs by o_t = o'_t[K:] + S_in^T o'_t[:K]: one kernel pass,
no second one. The fold and the all-gather are one autograd function whose backward sums every rank's state
gradients (an all-reduce), so gradients of q, k, v, beta and g equal those of one rank running the whole.

Packed documents (`cu_seqlens` over this piece's [B, T / c] flattened tokens, every row start included, and
`continues` [B]: whether each row's first token continues a document of the previous rank's piece; both from
`varlen.cut_cu_seqlens`): only a row's first segment may continue, so only it starts from [I | 0]; a document that
starts inside the piece (or at its first token) starts from [0 | 0], gives P = 0 at the row's end, and the carried
state restarts there. Each row's carry is its last segment's [P | N].

Communication per layer (forward): one all-gather of c x rows x H x K x (K + V) fp32 values, rows = B (packed
or not): `context_parallel_bytes`. The backward all-reduces a tensor of that size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_refine.kernels.utils import compute_dtype

__all__ = ["context_parallel_bytes", "context_parallel_delta_rule"]


def context_parallel_bytes(
    cp_size: int, rows: int, heads: int, head_k_dim: int, head_v_dim: int, element_size: int = 4
) -> int:
    """Bytes each rank receives from the forward's all-gather of one layer: c x rows x H x K x (K + V) values
    (rows: the batch's), fp32 (element_size 8: fp64 inputs, kept fp64)."""
    return cp_size * rows * heads * head_k_dim * (head_k_dim + head_v_dim) * element_size


def context_parallel_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    group: dist.ProcessGroup,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    continues: torch.Tensor | None = None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    output_states_after: bool = False,
    use_reference: bool = False,
):
    """`delta_rule` (g None) or `gated_delta_rule` over sequences split across the ranks of `group`.

    Args:
        q, k: [B, L, H, K]; v: [B, L, H, V]; beta: [B, L, H]; g: [B, L, H] log decay or None: this rank's piece r
            of every row, tokens [r L, (r + 1) L) (L = T / c).
        group: the context-parallel process group (size c, this rank's rank r in it).
        cu_seqlens: [N + 1] packed documents over this piece's B x L flattened tokens, every row start included
            (`varlen.cut_cu_seqlens`); None: each row is one sequence.
        continues: [B] bool, whether each row's first token continues the previous rank's piece of that row (a
            document runs on across the boundary); None: every row does, except on rank 0.
        output_final_state: also return the state after each sequence of this piece ([B or N, H, K, V], fp32): a
            sequence that ends in this piece has its whole run's final state.
        output_states_after: also return the reader positions [B, P] (packed: [1, P] into the B x L flattened
            tokens) -> states [B, P, H, K, V] (fp32), as `delta_rule`'s.
        scale, chunk_size, use_reference: as `delta_rule`'s.

    Every rank of the group must call this with the same shapes and backpropagate through its outputs (the
    backward all-reduces). Returns (o [B, L, H, V], final_state or None), plus `states_after` if asked.
    """
    from megatron_refine.kernels.delta_rule import delta_rule, gated_delta_rule  # the package imports this module

    B, L, H, K = q.shape
    V = v.shape[-1]
    r = dist.get_rank(group)
    acc, device = compute_dtype(v), v.device
    if continues is None:
        continues = torch.full((B,), r > 0, device=device)
    if cu_seqlens is None:  # each row one sequence: its first and last segment
        first = last = row_of = torch.arange(B, device=device)
        flat = lambda t: t  # noqa: E731
    else:
        first = torch.searchsorted(cu_seqlens, torch.arange(B, device=device, dtype=cu_seqlens.dtype) * L)
        last = torch.cat([first[1:], first.new_full((1,), cu_seqlens.numel() - 1)]) - 1
        row_of = torch.div(cu_seqlens[:-1], L, rounding_mode="floor")  # [N]: the row each segment lies in
        flat = lambda t: t.reshape(1, B * L, *t.shape[2:])  # noqa: E731
    # [segments, H, K, K + V]: [I | 0] for each row's first segment where it continues the previous piece, else 0
    init = torch.zeros(row_of.numel(), H, K, K + V, dtype=acc, device=device)
    init[first, ..., :K] = torch.eye(K, dtype=acc, device=device) * continues.to(acc)[:, None, None, None]
    v_wide = torch.cat([v.new_zeros(B, L, H, K), v], dim=-1)  # [B, L, H, K + V]
    kwargs = dict(scale=scale, initial_state=init, output_final_state=True, chunk_size=chunk_size,
                  output_states_after=output_states_after, cu_seqlens=cu_seqlens, use_reference=use_reference)
    gate = () if g is None else (flat(g),)
    rule = delta_rule if g is None else gated_delta_rule
    o_wide, final_wide, *reader = rule(flat(q), flat(k), flat(v_wide), *gate, flat(beta), **kwargs)
    o_wide = o_wide.view(B, L, H, K + V)
    s_in = _IncomingState.apply(final_wide[last].to(acc), group)  # [B, H, K, V]: each row's incoming state
    o = o_wide[..., K:].to(acc) + torch.einsum("bthk,bhkv->bthv", o_wide[..., :K].to(acc), s_in)
    final_state = _apply(final_wide, s_in[row_of]) if output_final_state else None
    if not output_states_after:
        return o.to(v.dtype), final_state

    def states_after(positions: torch.Tensor) -> torch.Tensor:  # [B, P] (packed [1, P]) -> [B, P, H, K, V]
        rows = s_in[:, None] if cu_seqlens is None else s_in[torch.div(positions, L, rounding_mode="floor")]
        return _apply(reader[0](positions), rows)

    return o.to(v.dtype), final_state, states_after


def _apply(wide: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
    """States [..., K, K + V] holding [P | N] -> P S_in + N [..., K, V] (S_in broadcast over the leading dims)."""
    K = wide.shape[-2]
    return wide[..., :K] @ s_in.to(wide.dtype) + wide[..., K:]


class _IncomingState(torch.autograd.Function):
    """Every rank's carry [P | N] [rows, H, K, K + V] -> the state piece r starts from, S_in(r) [rows, H, K, V]:
    all-gather, then fold S <- P_j S + N_j over j < r from S = 0, in the carries' dtype (fp32, or fp64). The
    backward folds back, then all-reduces the gradients of every rank's carry and keeps its own: every rank
    must run it (each output depends on S_in, rank 0's zeros included)."""

    @staticmethod
    def forward(ctx, carry, group):
        c, r = dist.get_world_size(group), dist.get_rank(group)
        K = carry.shape[-2]
        parts = [torch.empty_like(carry) for _ in range(c)]  # a list: the one all-gather every backend and version has
        dist.all_gather(parts, carry.contiguous(), group=group)
        carries = torch.stack(parts)  # [c, rows, H, K, K + V]
        states = [carry.new_zeros(*carry.shape[:-1], carry.shape[-1] - K)]  # states[j]: the state piece j starts from
        for j in range(r):
            states.append(carries[j, ..., :K] @ states[-1] + carries[j, ..., K:])
        ctx.save_for_backward(carries, *states)
        ctx.group = group
        return states[-1]

    @staticmethod
    def backward(ctx, d_s_in):
        carries, *states = ctx.saved_tensors
        r, K = len(states) - 1, carries.shape[-2]
        d_carries = torch.zeros_like(carries)
        d_state = d_s_in
        for j in range(r - 1, -1, -1):  # d_state: the gradient of the state piece j + 1 starts from
            d_carries[j, ..., :K] = d_state @ states[j].transpose(-1, -2)
            d_carries[j, ..., K:] = d_state
            d_state = carries[j, ..., :K].transpose(-1, -2) @ d_state
        dist.all_reduce(d_carries, group=ctx.group)
        return d_carries[dist.get_rank(ctx.group)], None
