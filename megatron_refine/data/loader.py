"""Packed pretraining batches from tokenized shards: DP-sharded, deterministic, resumable.

Data-parallel rank r of d reads shards r, r+d, r+2d, ... (in a seeded order that changes each epoch) and
concatenates their documents (each already ends with EOS) into one token stream, cut into samples of
seq_length + 1 tokens: inputs are the first seq_length, labels the last seq_length (Megatron's convention;
consecutive samples overlap by one token). Each batch also carries the document starts of its rows as
`cu_seqlens` over the B * T input tokens (row-major, every row start included): the model restarts its
fast-weight state there (`models/packing.py`). A document's EOS belongs to it; the next document starts on
the token after. The loader's position (epoch, shard, document, leftover tokens and where documents start in
them) is a small dict that checkpoints save, so a resumed run sees exactly the batches it would have.
Shards are read in the training process: they are pre-tokenized, so reading is not a bottleneck.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from megatron_refine.data.shards import DataError, ShardedDataset


@dataclass
class LoaderState:
    epoch: int = 0
    shard: int = 0  # index into this rank's shard order for the epoch
    document: int = 0  # documents of that shard already consumed
    leftover: list[int] = field(default_factory=list)  # tokens read but not yet emitted
    leftover_starts: list[int] = field(default_factory=list)  # indices in `leftover` where a document starts


class PackedLoader:
    def __init__(
        self,
        dataset: ShardedDataset | str,
        seq_length: int,
        micro_batch_size: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
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
        self.state = LoaderState()
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

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{'tokens', 'labels', 'loss_mask': [micro_batch, seq_length], 'cu_seqlens': [documents + 1] over the
        flattened tokens}"""
        samples, cu_seqlens = [], [0]
        for b in range(self.micro_batch_size):
            sample, starts = self.next_sample()
            samples.append(sample)
            row = b * self.seq_length
            cu_seqlens += [row + i for i in starts if 0 < i < self.seq_length] + [row + self.seq_length]
        batch = torch.from_numpy(np.stack(samples))
        tokens = batch[:, :-1].contiguous()
        return {
            "tokens": tokens,
            "labels": batch[:, 1:].contiguous(),
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int64),
            # 0 where the input is an EOS: its label is the next document's first token (Megatron's eod_mask_loss)
            "loss_mask": (tokens != self.dataset.eos_id).float(),
        }

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(**state)
        self._documents = None
