"""Pretraining batches from tokenized shards: DP-sharded, deterministic, resumable; two layouts.

Data-parallel rank r of d reads shards r, r+d, r+2d, ... (in a seeded order that changes each epoch), each
shard's documents in order, and wraps around into the next epoch (`DocumentStream`). Every sample is
seq_length + 1 tokens: inputs are the first seq_length, labels the last seq_length (Megatron's convention).

`PackedLoader` (data.layout: packed) concatenates the documents (each already ends with EOS) into one token
stream cut into samples (consecutive samples overlap by one token). Each batch also carries the document starts
of its rows as `cu_seqlens` over the B * T input tokens (row-major, every row start included; None without
reset_at_document_boundaries): the model restarts its fast-weight state there (`models/packing.py`). A
document's EOS belongs to it; the next document starts on the token after; with `eod_mask_loss` its label (the
next document's first token) gets no loss.

`DocumentLoader` (data.layout: documents) gives each row one document from its first token, truncated to
seq_length + 1 tokens, as REFINE's mid-training does: a row holds no document boundary, so a GRPO group is
one document's rollouts. Documents shorter than `min_document_tokens` are skipped (and counted); shorter than
seq_length + 1 but long enough, they are right-padded with EOS, with no loss on the padding.
Both yield `Batch`es (data/batch.py) that say what to train on.

The loader's position (epoch, shard, document; packed: leftover tokens and where documents start in them) is
a small dict that checkpoints save, so a resumed run sees exactly the batches it would have.
Shards are read in the training process: they are pre-tokenized, so reading is not a bottleneck.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megatron_refine.data.batch import Batch
from megatron_refine.data.shards import DataError, ShardedDataset, describe_lengths, merge_length_stats


@dataclass
class LoaderState:
    epoch: int = 0
    shard: int = 0  # index into this rank's shard order for the epoch
    document: int = 0  # documents of that shard already consumed
    leftover: list[int] = field(default_factory=list)  # tokens read but not yet emitted
    leftover_starts: list[int] = field(default_factory=list)  # indices in `leftover` where a document starts


@dataclass
class DocumentLoaderState:
    epoch: int = 0
    shard: int = 0
    document: int = 0
    skipped: int = 0  # documents shorter than min_document_tokens passed over so far (this rank, all epochs)


class DocumentStream:
    """This DP rank's documents, endlessly, and the position in them (`state`) that checkpoints save."""

    layout: str  # the data.layout the subclass implements
    State: type  # its position, a dataclass

    def __init__(
        self,
        dataset: ShardedDataset | str,
        seq_length: int,
        micro_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        eod_mask_loss: bool = False,
    ):
        self.dataset = dataset if isinstance(dataset, ShardedDataset) else ShardedDataset.open(dataset)
        names = self.dataset.shard_names
        if len(names) < dp_size:
            shard_size = max(1, self.dataset.metadata["num_documents"] // dp_size)  # >= dp_size shards in all
            raise DataError(
                f"{self.dataset.path} has {len(names)} shards but {dp_size} data-parallel ranks read it: preprocess "
                f"with a smaller --shard-size so there are at least {dp_size} shards: "
                f"`{self.dataset.preprocess_command(shard_size=shard_size, overwrite=True)}`"
            )
        self.my_shards = names[dp_rank::dp_size]
        self.seq_length, self.micro_batch_size, self.seed = seq_length, micro_batch_size, seed
        self.eod_mask_loss = eod_mask_loss  # Megatron's: no loss on the labels past a document's EOS
        self.state = self.State()
        self._documents = None  # iterator over the current shard, positioned at state.document

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.my_shards)
        random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def _next_document(self) -> np.ndarray:
        for _ in range(2 * len(self.my_shards) + 1):
            if self._documents is None:
                shard = self._shard_order(self.state.epoch)[self.state.shard]
                self._documents = self.dataset.documents(shard, skip=self.state.document)
            document = next(self._documents, None)
            if document is not None:
                self.state.document += 1
                return document
            self._documents = None
            self.state.document = 0
            self.state.shard += 1
            if self.state.shard == len(self.my_shards):
                self.state.shard, self.state.epoch = 0, self.state.epoch + 1
        raise DataError(f"the shards of {self.dataset.path} for this rank hold no documents")

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        expected = {f.name for f in dataclasses.fields(self.State)}
        if set(state) != expected:
            raise ValueError(
                f"the checkpoint's data position ({sorted(state)}) is not one of data.layout={self.layout} "
                f"({sorted(expected)}): resume with the data.layout the checkpoint was trained with, or start this "
                "layout from its weights with checkpoint.finetune=true"
            )
        self.state = self.State(**state)
        self._documents = None


class PackedLoader(DocumentStream):
    layout, State = "packed", LoaderState

    def __init__(self, dataset: ShardedDataset | str, seq_length: int, micro_batch_size: int, *,
                 reset_at_document_boundaries: bool = True, **kwargs):
        super().__init__(dataset, seq_length, micro_batch_size, **kwargs)
        self.reset_at_document_boundaries = reset_at_document_boundaries

    def next_sample(self) -> tuple[np.ndarray, list[int]]:
        """seq_length + 1 consecutive tokens of the stream, and the indices in them where documents start."""
        need = self.seq_length + 1
        tokens, starts = list(self.state.leftover), list(self.state.leftover_starts)
        while len(tokens) < need:
            starts.append(len(tokens))
            tokens.extend(self._next_document().tolist())
        # The last token is also the next sample's first (labels overlap inputs by one).
        self.state.leftover = tokens[need - 1 :]
        self.state.leftover_starts = [i - (need - 1) for i in starts if i >= need - 1]
        return np.asarray(tokens[:need], dtype=np.int64), [i for i in starts if i < need]

    def next_batch(self) -> Batch:
        """Rows of the stream; cu_seqlens [documents + 1] over the flattened tokens."""
        samples, cu_seqlens = [], [0]
        for b in range(self.micro_batch_size):
            sample, starts = self.next_sample()
            samples.append(sample)
            row = b * self.seq_length
            cu_seqlens += [row + i for i in starts if 0 < i < self.seq_length] + [row + self.seq_length]
        batch = torch.from_numpy(np.stack(samples))
        tokens = batch[:, :-1].contiguous()
        return Batch(
            tokens, batch[:, 1:].contiguous(),
            # 0 where the input is an EOS: its label is the next document's first token
            loss_mask=(tokens != self.dataset.eos_id).float() if self.eod_mask_loss else None,
            cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int64) if self.reset_at_document_boundaries else None,
        )


class DocumentLoader(DocumentStream):
    layout, State = "documents", DocumentLoaderState

    def __init__(self, dataset: ShardedDataset | str, seq_length: int, micro_batch_size: int, *,
                 min_document_tokens: int | None = None, pad_short_documents: bool = False, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, eod_mask_loss: bool = False):
        super().__init__(dataset, seq_length, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                         eod_mask_loss=eod_mask_loss)
        self.pad_short_documents = pad_short_documents
        need = seq_length + 1
        self.min_document_tokens = need if min_document_tokens is None else min_document_tokens
        if self.min_document_tokens < 2:
            raise ValueError(f"min_document_tokens must be >= 2 (an input token and its label), got "
                             f"{self.min_document_tokens}; leave it unset for seq_length + 1 = {need}")
        if self.min_document_tokens < need and not pad_short_documents:
            raise ValueError(f"min_document_tokens ({self.min_document_tokens}) is below seq_length + 1 ({need}): "
                             "shorter documents fill no row unless pad_short_documents is set")
        shards = {s["name"]: s for s in self.dataset.metadata["shards"]}
        self._rank_documents = sum(shards[name]["documents"] for name in self.my_shards)
        # Every rank checks every rank's shards, so all of them stop together rather than some waiting forever.
        for rank in range(dp_size):
            stats = merge_length_stats([shards[name] for name in self.dataset.shard_names[rank::dp_size]])
            if stats and stats["max_document_tokens"] < self.min_document_tokens:
                raise DataError(self._none_long_enough(rank if dp_size > 1 else None))

    def _none_long_enough(self, rank: int | None) -> str:
        where = f"the shards of data-parallel rank {rank} of " if rank is not None else ""
        return (
            f"no document in {where}{self.dataset.path} has the {self.min_document_tokens} tokens that data.layout="
            f"documents needs (min_document_tokens; a row is data.seq_length + 1 = {self.seq_length + 1} tokens of one "
            f"document). Documents with at least N tokens ({self.dataset.path}/metadata.json): "
            f"{describe_lengths(merge_length_stats(self.dataset.metadata['shards']))}. Lower data.seq_length, or lower "
            "data.min_document_tokens with data.pad_short_documents=true, or use data.layout=packed"
        )

    def summary(self) -> str:
        """What the start-up log says: the rule, and the data's length statistics."""
        rule = f"the first {self.seq_length + 1} tokens of each document with >= {self.min_document_tokens} tokens"
        if self.min_document_tokens <= self.seq_length:
            rule += f", EOS-padded to {self.seq_length + 1} (no loss on the padding)"
        return (f"data.layout=documents: one document per row, {rule}; shorter ones are skipped (counted in the "
                f"loader state's `skipped`). Documents with at least N tokens: "
                f"{describe_lengths(merge_length_stats(self.dataset.metadata['shards']))}")

    def next_sample(self) -> np.ndarray:
        """The next document with at least min_document_tokens tokens, cut to its first seq_length + 1."""
        for _ in range(max(1, self._rank_documents)):  # a whole epoch of this rank's documents, at most
            document = self._next_document()
            if document.size >= self.min_document_tokens:
                return document[: self.seq_length + 1]
            self.state.skipped += 1
        raise DataError(self._none_long_enough(None))

    def next_batch(self) -> Batch:
        """One document a row, so no cu_seqlens: no boundary inside a row, the padding only trails it."""
        B, T = self.micro_batch_size, self.seq_length
        rows = np.full((B, T + 1), self.dataset.eos_id, dtype=np.int64)  # EOS past a short document's end
        lengths = torch.empty(B, dtype=torch.int64)
        for b in range(B):
            document = self.next_sample()
            rows[b, : document.size], lengths[b] = document, document.size
        batch = torch.from_numpy(rows)
        real = (torch.arange(T)[None] < lengths[:, None] - 1).float()  # 0 where the label is padding
        # Without padding every label is real: the mask is kept only where eod_mask_loss asks for it.
        return Batch(batch[:, :-1].contiguous(), batch[:, 1:].contiguous(),
                     loss_mask=real if self.eod_mask_loss or self.pad_short_documents else None,
                     branch_lengths=real.sum(1).long() if self.pad_short_documents else None)
