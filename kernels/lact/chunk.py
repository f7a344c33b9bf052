"""LaCT's large-chunk fast-weight SwiGLU in PyTorch: chunked forward, decode step, states after positions.

Per head the fast weights are w0, w2 [Dh, D] and w1 [D, Dh]; f(x) = w1 (silu(w0 x) * (w2 x)).
Block-causal, apply-then-update: the tokens of chunk n read the weights left by chunks 0..n-1, then the
chunk's keys and values update them by one step of gradient descent on -<f(k), v>, each token's gradient
weighted by its own learning rate (one per weight), summed over the chunk. Options: momentum (the chunk's
mean momentum coefficient times the previous update), Muon (Newton-Schulz-5 of the update), and weight norm
(each row rescaled back to its initial L2 norm). A chunk's update fires when its last token arrives, so the
state after token p is (weights after the chunks completed by p, the partial chunk's keys / values / rates).
All math in fp32 (fp64 inputs stay fp64); internally heads fold into the batch: [M = N * H, ...].
Host reads: whether a chunk's update fires is decided from the layout's host lengths (and, in the decode step,
from the lengths the previous step left on `state.length`), so neither the chunked forward nor a decode loop
reads the device; only `states_after` (which chunks the positions need is data) and a state from elsewhere do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from megatron_refine.kernels.lact.muon import zeropower_via_newtonschulz5
from megatron_refine.kernels.utils import compute_dtype, version_of
from megatron_refine.kernels.varlen import ChunkLayout, prepare_lens

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_NORM_EPS = 1e-5


@dataclass
class LaCTState:
    """The memory of one LaCT layer for N rows (sequences, or branches of them)."""

    w0: torch.Tensor  # [N, H, Dh, D]
    w1: torch.Tensor  # [N, H, D, Dh]
    w2: torch.Tensor  # [N, H, Dh, D]
    k: torch.Tensor  # [N, C, H, D], the partial chunk's keys (zero past `length`)
    v: torch.Tensor  # [N, C, H, D]
    lr: torch.Tensor  # [N, C, H, 3], per-token rates for w0, w1, w2
    length: torch.Tensor  # [N], tokens in the partial chunk (the step keeps a host copy on it: `_host_lengths`)
    norms: Weights | None = None  # initial row norms [N, H, rows, 1], when weight norm is on
    dw: Weights | None = None  # the previous update, when momentum is on
    momentum: torch.Tensor | None = None  # [N, C, H], the partial chunk's momentum coefficients

    @property
    def chunk_size(self) -> int:
        return self.k.shape[1]

    @classmethod
    def initial(
        cls,
        w0: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        batch_size: int,
        chunk_size: int,
        *,
        use_momentum: bool = False,
        weight_norm: bool = True,
    ) -> "LaCTState":
        """The state before the first token: learned initial weights ([H, ...]) copied per row."""
        w = tuple(x.to(compute_dtype(x)).expand(batch_size, *x.shape) for x in (w0, w1, w2))
        H, D = w1.shape[0], w1.shape[1]
        zeros = w[0].new_zeros
        length = torch.zeros(batch_size, dtype=torch.long, device=w0.device)
        return cls(
            *w,
            k=zeros(batch_size, chunk_size, H, D),
            v=zeros(batch_size, chunk_size, H, D),
            lr=zeros(batch_size, chunk_size, H, 3),
            length=_with_host_lengths(length, [0] * batch_size),
            norms=tuple(x.norm(dim=-1, keepdim=True) for x in w) if weight_norm else None,
            dw=tuple(torch.zeros_like(x) for x in w) if use_momentum else None,
            momentum=zeros(batch_size, chunk_size, H) if use_momentum else None,
        )


def swiglu_apply(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(x) for x [M, L, D] with weights [M, Dh, D], [M, D, Dh], [M, Dh, D] -> [M, L, D]."""
    return (F.silu(x @ w0.mT) * (x @ w2.mT)) @ w1.mT


def swiglu_update(
    w: Weights,
    k: torch.Tensor,  # [M, L, D]
    v: torch.Tensor,  # [M, L, D]
    lr: torch.Tensor,  # [M, L, 3]
    momentum: torch.Tensor | None,  # [M, L]
    dw_prev: Weights | None,
    norms: Weights | None,
    use_muon: bool,
    ns_coefficients: Sequence[tuple[float, float, float]],
) -> tuple[Weights, Weights | None]:
    """One chunk's update: gradient ascent on sum_t lr_t <f(k_t), v_t>, per weight, written out by hand."""
    w0, w1, w2 = w
    gate = k @ w0.mT  # [M, L, Dh]
    hidden = k @ w2.mT
    sig = torch.sigmoid(gate)
    act = gate * sig
    dh = v @ w1  # d<h w1^T, v>/dh, [M, L, Dh]
    d_hidden = dh * act
    d_gate = dh * hidden * sig * (1 + gate * (1 - sig))  # silu'(x) = sig(x) (1 + x (1 - sig(x)))
    dw = (
        d_gate.mT @ (k * lr[..., 0:1]),  # [M, Dh, D]
        (v * lr[..., 1:2]).mT @ (act * hidden),  # [M, D, Dh]
        d_hidden.mT @ (k * lr[..., 2:3]),  # [M, Dh, D]
    )
    if momentum is not None:
        coef = momentum.mean(dim=1)[:, None, None]  # [M, 1, 1]
        dw = tuple(d + coef * p for d, p in zip(dw, dw_prev))
    step = tuple(zeropower_via_newtonschulz5(d, ns_coefficients) for d in dw) if use_muon else dw
    w = tuple(wi + si for wi, si in zip(w, step))
    if norms is not None:
        w = tuple(wi / (wi.norm(dim=-1, keepdim=True) + _NORM_EPS) * ni for wi, ni in zip(w, norms))
    return w, (dw if momentum is not None else None)


def _fold(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L, H, ...] -> [N * H, L, ...]: heads into the batch."""
    N, L, H = x.shape[:3]
    return x.to(dtype).transpose(1, 2).reshape(N * H, L, *x.shape[3:])


def _fold_weights(x: torch.Tensor) -> torch.Tensor:
    """[N, H, a, b] -> [N * H, a, b]."""
    return x.reshape(-1, *x.shape[2:])


def _heads_into_rows(x: torch.Tensor) -> torch.Tensor:
    """[pairs, C, H, ...] -> [pairs * H, C, ...]."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], *x.shape[3:])


def lact_swiglu_torch(
    q: torch.Tensor,  # [total, H, D], packed sequences
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,  # [total, H, 3]
    momentum: torch.Tensor | None,  # [total, H]
    layout: ChunkLayout,  # the N sequences cut into chunks
    weights: Weights,  # each [N, H, ...]: the weights each sequence starts from
    norms: Weights | None,  # [N, H, rows, 1] row norms weight norm restores, None for no weight norm
    dw: Weights | None,  # [N, H, ...] previous update (momentum on), or None
    use_muon: bool,
    ns_coefficients: Sequence[tuple[float, float, float]],
    output_final_state: bool,
    output_states_after: bool,
) -> tuple[torch.Tensor, LaCTState | None, Callable[[torch.Tensor], LaCTState] | None]:
    """-> (o [total, H, D], final LaCTState of N rows, states_after: token indices [P] -> LaCTState of P rows)."""
    total, H, D = q.shape
    C, order, lengths = layout.chunk_size, layout.order, layout.lengths
    acc = compute_dtype(q)
    qf, kf, vf, lrf = (_heads_into_rows(layout.gather(x.to(acc))) for x in (q, k, v, lr))  # [pairs*H, C, ...]
    mf = None if momentum is None else _heads_into_rows(layout.gather(momentum.to(acc)))
    in_order = lambda ws: None if ws is None else tuple(_fold_weights(x.to(acc)[order]) for x in ws)  # noqa: E731
    w, norms, dw = in_order(weights), in_order(norms), in_order(dw)

    def update(j: int, w: Weights, dw: Weights | None) -> tuple[Weights, Weights | None]:
        """(weights, dw) after chunk j's update, in the sequences that complete chunk j."""
        m, end = layout.active[j], (j + 1) * C
        rows = slice(layout.offsets[j] * H, (layout.offsets[j] + m) * H)
        new_w, new_dw = swiglu_update(
            tuple(x[: m * H] for x in w), kf[rows], vf[rows], lrf[rows], None if mf is None else mf[rows],
            None if dw is None else tuple(x[: m * H] for x in dw),
            None if norms is None else tuple(x[: m * H] for x in norms), use_muon, ns_coefficients,
        )
        fired = None  # every running sequence's update fired
        if not all(n >= end for n in lengths[:m]):
            fired = (prepare_lens(layout.cu_seqlens)[order[:m]] >= end).repeat_interleave(H)[:, None, None]

        def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # the fired rows updated, the rest kept
            new = new if fired is None else torch.where(fired, new, old[: m * H])
            return new if m * H == old.shape[0] else torch.cat([new, old[m * H :]])

        merged_dw = None if dw is None else tuple(merge(a, b) for a, b in zip(dw, new_dw))
        return tuple(merge(a, b) for a, b in zip(w, new_w)), merged_dw

    # (weights, dw) after c completed chunks: each one the next chunk reads (so autograd keeps it anyway), in
    # layout order [N*H, ...]. The last chunk's update is read by no chunk: it is made only if a state needs it.
    snapshots = {0: (w, dw)}
    outputs = []
    for j, m in enumerate(layout.active):
        outputs.append(swiglu_apply(*(x[: m * H] for x in w), qf[layout.offsets[j] * H : (layout.offsets[j] + m) * H]))
        if j + 1 < len(layout.active):
            w, dw = snapshots[j + 1] = update(j, w, dw)
    o = torch.cat(outputs).view(-1, H, C, D).transpose(1, 2)  # [pairs, C, H, D]
    o = layout.scatter(o, total).to(v.dtype)

    def read(positions: torch.Tensor, needed: set[int]) -> LaCTState:  # needed: the snapshots the positions read
        last = len(layout.active)
        if last in needed and last not in snapshots:  # a sequence of last * C tokens, asked for after its end
            snapshots[last] = update(last - 1, w, dw)
        picked = {n: snapshots[n] for n in sorted(needed)}
        return _states_after(layout, positions, picked, norms, k, v, lr, momentum, acc)

    def states_after(positions: torch.Tensor) -> LaCTState:
        within = positions - layout.cu_seqlens[layout.sequence_of(positions)]
        return read(positions, set(((within + 1) // C).tolist()))  # one host read: which snapshots is data

    final = read(layout.cu_seqlens[1:] - 1, {n // C for n in lengths}) if output_final_state else None
    return o, final, (states_after if output_states_after else None)


def _states_after(
    layout: ChunkLayout,
    positions: torch.Tensor,  # [P] token indices
    snapshots: dict[int, tuple[Weights, Weights | None]],  # completed chunks -> (weights, dw), [N*H, ...] in layout order
    norms: Weights | None,  # [N*H, rows, 1] in layout order
    k: torch.Tensor,  # [total, H, D]
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    dtype: torch.dtype,
) -> LaCTState:
    """States after each position: P rows."""
    C, H, device = layout.chunk_size, k.shape[1], positions.device
    seq = layout.sequence_of(positions)
    rank, within = layout.rank[seq], positions - layout.cu_seqlens[seq]
    completed = (within + 1) // C  # [P]
    order = sorted(snapshots)
    slot_of = torch.zeros(max(order) + 1, dtype=torch.long, device=device)
    slot_of[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
    slot = slot_of[completed]

    def per_row(x: torch.Tensor) -> torch.Tensor:  # [N*H, a, c] -> [P, H, a, c]
        return x.view(-1, H, *x.shape[1:])[rank]

    def pick(get) -> torch.Tensor:  # the snapshot each position needs, [P, H, a, c]
        stacked = torch.stack([get(snapshots[n]).view(-1, H, *get(snapshots[n]).shape[1:]) for n in order])
        return stacked[slot, rank]

    length = within + 1 - completed * C  # [P], in [0, C)
    offsets = torch.arange(C, device=device)
    index = (positions + 1 - length)[:, None] + offsets  # [P, C]
    valid = offsets < length[:, None]
    index = torch.where(valid, index, positions[:, None])

    def partial(x: torch.Tensor) -> torch.Tensor:  # [total, H, ...] -> [P, C, H, ...]
        g = x.to(dtype)[index]
        return g * valid.view(*valid.shape, *([1] * (g.ndim - 2))).to(dtype)

    has_momentum = momentum is not None
    return LaCTState(
        w0=pick(lambda s: s[0][0]),
        w1=pick(lambda s: s[0][1]),
        w2=pick(lambda s: s[0][2]),
        k=partial(k),
        v=partial(v),
        lr=partial(lr),
        length=length,
        norms=tuple(per_row(n) for n in norms) if norms is not None else None,
        dw=tuple(pick(lambda s, i=i: s[1][i]) for i in range(3)) if has_momentum else None,
        momentum=partial(momentum) if has_momentum else None,
    )


def lact_swiglu_step_torch(
    q: torch.Tensor,  # [N, H, D]
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,  # [N, H, 3]
    momentum: torch.Tensor | None,  # [N, H]
    state: LaCTState,
    use_muon: bool,
    ns_coefficients: Sequence[tuple[float, float, float]],
) -> tuple[torch.Tensor, LaCTState]:
    """Read with the current weights, append the token to the partial chunk, update rows whose chunk completes."""
    N, H, D = q.shape
    C = state.chunk_size
    acc = state.w0.dtype
    lengths = [n + 1 for n in _host_lengths(state.length)]
    w = tuple(_fold_weights(x) for x in (state.w0, state.w1, state.w2))
    o = swiglu_apply(*w, q.to(acc).reshape(N * H, 1, D)).view(N, H, D)

    slot = (torch.arange(C, device=state.length.device) == state.length[:, None]).to(acc)  # [N, C]: one-hot, no read
    kb = state.k + slot[..., None, None] * k.to(acc)[:, None]
    vb = state.v + slot[..., None, None] * v.to(acc)[:, None]
    lrb = state.lr + slot[..., None, None] * lr.to(acc)[:, None]
    mb = None if momentum is None else state.momentum + slot[..., None] * momentum.to(acc)[:, None]
    length = state.length + 1
    dw = None if state.dw is None else tuple(_fold_weights(x) for x in state.dw)

    if C in lengths:
        full = length == C  # [N]
        norms = None if state.norms is None else tuple(_fold_weights(x) for x in state.norms)
        new_w, new_dw = swiglu_update(
            w, _fold(kb, acc), _fold(vb, acc), _fold(lrb, acc), None if mb is None else _fold(mb, acc),
            dw, norms, use_muon, ns_coefficients,
        )
        fired = full.repeat_interleave(H)[:, None, None]  # [N*H, 1, 1]
        w = tuple(torch.where(fired, a, b) for a, b in zip(new_w, w))
        if dw is not None:
            dw = tuple(torch.where(fired, a, b) for a, b in zip(new_dw, dw))
        keep = (~full).to(acc)
        kb, vb, lrb = (x * keep[:, None, None, None] for x in (kb, vb, lrb))
        mb = None if mb is None else mb * keep[:, None, None]
        length = torch.where(full, torch.zeros_like(length), length)
        lengths = [n % C for n in lengths]

    unfold = lambda x: x.view(N, H, *x.shape[1:])  # noqa: E731
    return o, replace(
        state,
        w0=unfold(w[0]), w1=unfold(w[1]), w2=unfold(w[2]),
        k=kb, v=vb, lr=lrb, length=_with_host_lengths(length, lengths), momentum=mb,
        dw=None if dw is None else tuple(unfold(x) for x in dw),
    )


def _with_host_lengths(length: torch.Tensor, values: list[int]) -> torch.Tensor:
    """Leave `length`'s values on the tensor (with its version), for the next decode step to read without a sync."""
    length._host_lengths = (version_of(length), values)
    return length


def _host_lengths(length: torch.Tensor) -> list[int]:
    """`state.length` on the host: left by `LaCTState.initial` or the previous step on the tensor they made, else
    read once (a state from `states_after` or an indexed cache: a new tensor, so its values are only on the device)."""
    known = getattr(length, "_host_lengths", None)
    if known is None or known[0] != version_of(length):
        _with_host_lengths(length, length.tolist())  # data-dependent: which rows complete a chunk this step
    return length._host_lengths[1]
