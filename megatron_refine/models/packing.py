"""Document boundaries of a packed micro-batch, as the mixers use them.

The data loader packs several documents into each row of a `[B, T]` micro-batch and says where each starts;
the trainer hands that to the model as megatron-core's `PackedSeqParams` (`qkv_format="thd"`) whose
`cu_seqlens_q` indexes the micro-batch's B * T tokens row-major (with B = 1 that is exactly Megatron's thd
layout). Every row start is a boundary too. The mixers turn it into a `Packing`: fla's `cu_seqlens` over the
flattened batch, plus each token's document and position inside it, so the fast-weight state, the short
convolution, the sliding window and RoPE all restart at every document, as if it had been run alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_refine.kernels.varlen import prepare_position_ids, prepare_sequence_ids


@dataclass
class Packing:
    cu_seqlens: torch.Tensor  # [N + 1] over the B * T tokens, row starts included
    batch: int
    length: int
    # [B]: a context-parallel piece's (models/context_parallel.py), the position inside its document of each row's
    # first token (> 0: the document began on an earlier rank); None: the rows hold whole documents.
    first_positions: torch.Tensor | None = None

    @classmethod
    def from_params(cls, params: PackedSeqParams | None, batch: int, length: int) -> "Packing | None":
        """Built once per forward: kept on the params object, which every layer receives.

        The document starts are validated here, once per forward (one host read): the kernels check only
        metadata on CUDA, as reading values there would stall the stream in every layer (`kernels/utils.py`).
        """
        if params is None:
            return None
        cached = getattr(params, "_packing", None)
        if cached is not None and (cached.batch, cached.length) == (batch, length):
            return cached
        cu, total = params.cu_seqlens_q, batch * length
        is_starts = isinstance(cu, torch.Tensor) and cu.ndim == 1 and cu.dtype in (torch.int32, torch.int64)
        starts = cu.tolist() if is_starts else None
        if starts is None or len(starts) < 2 or starts[0] != 0 or starts[-1] != total:
            raise ValueError(
                f"packed_seq_params.cu_seqlens_q must run from 0 to the micro-batch's {batch} x {length} tokens "
                f"(a 1-D int tensor of document starts over the row-major flattened batch), got {starts or cu}"
            )
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(
                f"packed_seq_params.cu_seqlens_q must be strictly increasing (no empty documents), got {starts}"
            )
        starts = sorted(set(starts).union(range(0, total, length)))  # every row start is a boundary too
        params._packing = cls(torch.tensor(starts, dtype=cu.dtype, device=cu.device), batch, length)
        return params._packing

    @cached_property
    def position_ids(self) -> torch.Tensor:
        """[B, T]: each token's position inside its document."""
        local = prepare_position_ids(self.cu_seqlens, self.batch * self.length).view(self.batch, self.length)
        if self.first_positions is None:
            return local
        first_document = self.sequence_ids == self.sequence_ids[:, :1]
        return local + self.first_positions[:, None] * first_document

    @property
    def continues(self) -> torch.Tensor | None:
        """[B] bool, a context-parallel piece's: whether each row's first token continues a document of the previous
        rank's piece."""
        return None if self.first_positions is None else self.first_positions > 0

    @cached_property
    def sequence_ids(self) -> torch.Tensor:
        """[B, T]: the document each token belongs to."""
        return prepare_sequence_ids(self.cu_seqlens, self.batch * self.length).view(self.batch, self.length)

    @cached_property
    def thd_params(self) -> PackedSeqParams:
        """Megatron's PackedSeqParams of these documents (row starts included) over the flattened batch: Transformer
        Engine's THD attention layout. Built once per forward (one host read), shared by every attention layer."""
        return packed_seq_params(self.cu_seqlens.int())

    def flat(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [B, P] inside rows -> [1, B * P] indices into the flattened batch. The same tensor for the same
        positions tensor: every layer reading it then shares what a kernel derives from it (fla_path's plan)."""
        last = getattr(self, "_last_flat", None)
        if last is not None and last[0] is positions:
            return last[1]
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None] * self.length
        self._last_flat = (positions, (positions + rows).view(1, -1))
        return self._last_flat[1]

    def document_starts(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [B, P] -> the row index where each position's document starts, [B, P] (a context-parallel piece's:
        negative where it started on an earlier rank)."""
        b = torch.arange(positions.shape[0], device=positions.device)[:, None]
        return positions - self.position_ids[b, positions]


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """Megatron's PackedSeqParams for document starts `cu_seqlens` over a micro-batch's flattened tokens."""
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)
