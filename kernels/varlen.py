"""Variable-length (packed) sequences, fla's convention: inputs `[1, total, ...]` hold N sequences back to back
and `cu_seqlens [N + 1]` (int, from 0 to total) marks where each starts. Every fast-weight op starts each
sequence from its own initial state, exactly as if the sequences had been run one by one.

A `[B, T, ...]` batch is the special case of B sequences of length T (`batch_cu_seqlens`), so the chunked
ops have one code path: `ChunkLayout` cuts every sequence into chunks of C tokens that start at the
sequence's first token (no chunk spans two sequences, as in fla's varlen kernels).

Host reads: a batch's layout is built from Python ints (`ChunkLayout.for_batch`); a packed layout reads the
lengths once (`ChunkLayout.build`), and `packed_layout` keeps it for the `cu_seqlens` tensor every layer of a
forward receives, so a forward reads them once, not once per layer. The contents of `cu_seqlens` are a value
check (`kernels/utils.py`): by default CPU only; the model validates them once per forward (`models/packing.py`).
"""

from __future__ import annotations

import bisect
import functools
from collections import deque
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from megatron_refine.kernels.utils import value_checks_on, version_of


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, total: int) -> None:
    """Errors a caller can cause, with the fix. The contents are a value check (`set_debug_checks`)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be a 1-D int32/int64 tensor [N + 1] of cumulative sequence lengths")
    if batch != 1:
        raise ValueError(
            f"with cu_seqlens the inputs must have batch size 1 (sequences concatenated along time), got {batch}: "
            "flatten the batch to [1, B * T] and include every row start in cu_seqlens"
        )
    if cu_seqlens.numel() < 2 or value_checks_on(cu_seqlens):
        starts = cu_seqlens.tolist()
        if len(starts) < 2 or starts[0] != 0 or starts[-1] != total:
            raise ValueError(f"cu_seqlens must start at 0 and end at the total length {total}, got {starts}")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {starts}")


def batch_cu_seqlens(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens of a [B, T] batch seen as B sequences of length T."""
    return torch.arange(batch + 1, device=device) * length


def cut_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int, size: int, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context parallelism: the documents of a [batch, size x length] micro-batch (`cu_seqlens` over its flattened
    tokens) cut to piece `rank` of every row, tokens [rank x length, (rank + 1) x length) -> (the piece's cu_seqlens over
    its [batch, length] flattened tokens, every row start included; the position inside its document of each row's
    first token [batch], 0 where a document starts there). One host read."""
    total = batch * size * length
    check_cu_seqlens(cu_seqlens, 1, total)
    starts = sorted(set(cu_seqlens.tolist()[:-1]).union(range(0, total, size * length)))
    local, first = [], []
    for b in range(batch):
        lo = b * size * length + rank * length
        i = bisect.bisect_right(starts, lo) - 1  # the document the piece row starts in
        first.append(lo - starts[i])
        local += [b * length] + [s - lo + b * length for s in starts[i + 1:] if s < lo + length]
    as_tensor = functools.partial(torch.tensor, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return as_tensor(local + [batch * length]), as_tensor(first)


def prepare_lens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def prepare_sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total]: the index of the sequence each token belongs to."""
    return torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device),
                                   prepare_lens(cu_seqlens), output_size=total)


def prepare_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total]: each token's position within its own sequence."""
    return torch.arange(total, device=cu_seqlens.device) - cu_seqlens[prepare_sequence_ids(cu_seqlens, total)]


@dataclass
class ChunkLayout:
    """The (sequence, chunk) pairs of packed sequences, ordered chunk-major.

    Sequences are visited most-chunks-first (`order`), so the sequences still running at chunk j are the
    first `active[j]` of that order and a recurrence over chunks updates a prefix of its per-sequence state.
    Pair (j, i) is chunk j of sequence order[i]; it sits at row `offsets[j] + i`. The host lists (`lengths`,
    `active`, `offsets`) steer the chunk loops without reading tensors.
    """

    chunk_size: int
    cu_seqlens: torch.Tensor  # [N + 1]
    lengths: list[int]  # [N] sequence lengths, in `order`
    order: torch.Tensor  # [N], sequences by decreasing number of chunks
    rank: torch.Tensor  # [N], where each sequence sits in `order`
    active: list[int]  # [J]: sequences with more than j chunks
    offsets: list[int]  # [J]: first pair of chunk j
    first_pair: torch.Tensor  # [J], `offsets` on the device
    index: torch.Tensor | None  # [pairs, C] token index of each slot (clamped inside the sequence); None if uniform
    valid: torch.Tensor | None  # [pairs, C] the slot holds a token; None if uniform
    uniform_length: int | None = None  # every sequence has this length (a [B, T] batch): reshapes, no gathers

    @classmethod
    def for_batch(cls, batch: int, length: int, chunk_size: int, device: torch.device) -> "ChunkLayout":
        """A [B, T] batch as B sequences of length T, from Python ints: no tensor is read."""
        N, J = batch, -(-length // chunk_size)
        order = torch.arange(N, device=device)
        return cls(chunk_size, batch_cu_seqlens(N, length, device), [length] * N, order, order, [N] * J,
                   [j * N for j in range(J)], torch.arange(J, device=device) * N, None, None, length)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, chunk_size: int) -> "ChunkLayout":
        """Reads the lengths once (a host sync on CUDA); the kernels go through `packed_layout`, which caches."""
        C, device = chunk_size, cu_seqlens.device
        lens = prepare_lens(cu_seqlens)
        lengths = lens.tolist()
        if all(n == lengths[0] for n in lengths):
            return replace(cls.for_batch(len(lengths), lengths[0], C, device), cu_seqlens=cu_seqlens)
        n_chunks = (lens + C - 1) // C
        order = torch.argsort(n_chunks, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device)
        lengths = sorted(lengths, key=lambda n: -((n + C - 1) // C))  # stable, as `order`
        per_seq = [(n + C - 1) // C for n in lengths]
        active = [sum(1 for n in per_seq if n > j) for j in range(per_seq[0])]
        offsets = [0]
        for m in active[:-1]:
            offsets.append(offsets[-1] + m)
        chunks = torch.arange(len(active), device=device)
        counts = (n_chunks[order] > chunks[:, None]).sum(1)  # [J], `active` built on the device (no copy to it)
        first_pair = torch.cumsum(counts, 0) - counts
        chunk = torch.repeat_interleave(chunks, counts, output_size=sum(active))  # [pairs]
        seq = order[torch.arange(chunk.numel(), device=device) - first_pair[chunk]]
        within = chunk[:, None] * C + torch.arange(C, device=device)  # [pairs, C], position inside the sequence
        valid = within < lens[seq][:, None]
        index = (cu_seqlens[seq][:, None] + within).clamp(max=cu_seqlens[seq + 1][:, None] - 1)
        return cls(C, cu_seqlens, lengths, order, rank, active, offsets, first_pair, index, valid)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @cached_property
    def token_slot(self) -> torch.Tensor:
        """[total]: each token's slot in the flattened [pairs * C] chunks (what `scatter` gathers)."""
        _, _, offset, pair = self.locate(torch.arange(sum(self.lengths), device=self.cu_seqlens.device))
        return pair * self.chunk_size + offset

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[total, ...] -> [pairs, C, ...], zeros in the slots past a sequence's end."""
        if self.uniform_length is not None:  # pad each sequence to whole chunks; pairs (j, n) chunk-major
            N, L, J, C = self.num_sequences, self.uniform_length, len(self.active), self.chunk_size
            x = x.view(N, L, *x.shape[1:])
            if J * C > L:
                x = torch.cat([x, x.new_zeros(N, J * C - L, *x.shape[2:])], dim=1)
            return x.view(N, J, C, *x.shape[2:]).transpose(0, 1).reshape(J * N, C, *x.shape[2:])
        mask = self.valid.view(*self.valid.shape, *([1] * (x.ndim - 1))).to(x.dtype)
        return x[self.index] * mask

    def scatter(self, y: torch.Tensor, total: int) -> torch.Tensor:
        """[pairs, C, ...] -> [total, ...]: each token's value from its slot (differentiable)."""
        if self.uniform_length is not None:
            N, L, J, C = self.num_sequences, self.uniform_length, len(self.active), self.chunk_size
            y = y.view(J, N, C, *y.shape[2:]).transpose(0, 1).reshape(N, J * C, *y.shape[2:])
            return y[:, :L].reshape(total, *y.shape[2:])
        return y.flatten(0, 1)[self.token_slot]

    def sequence_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Token indices [P] -> the sequence each belongs to [P]."""
        return torch.searchsorted(self.cu_seqlens, positions, right=True) - 1

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token indices [P] -> (sequence rank in `order` [P], chunk j [P], offset in the chunk [P], pair [P])."""
        seq = self.sequence_of(positions)
        within = positions - self.cu_seqlens[seq]
        chunk, offset = within // self.chunk_size, within % self.chunk_size
        rank = self.rank[seq]
        return rank, chunk, offset, self.first_pair[chunk] + rank


_PACKED_LAYOUTS: deque[tuple[int, ChunkLayout]] = deque(maxlen=8)


def packed_layout(cu_seqlens: torch.Tensor, chunk_size: int) -> ChunkLayout:
    """`ChunkLayout.build`, kept for the last few `cu_seqlens` tensors by identity (and version), the idea of
    fla's `tensor_cache`: every layer of a forward gets the same tensor, so its lengths are read once."""
    version = version_of(cu_seqlens)
    for seen, layout in _PACKED_LAYOUTS:
        if layout.cu_seqlens is cu_seqlens and seen == version and layout.chunk_size == chunk_size:
            return layout
    layout = ChunkLayout.build(cu_seqlens, chunk_size)
    _PACKED_LAYOUTS.append((version, layout))
    return layout
