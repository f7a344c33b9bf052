"""Tokenized webdataset shards: one tar sample per document (`tokens.npy`), and `metadata.json` beside them.

metadata.json: {"format": 1, "tokenizer": {...}, "vocab_size", "eos_id", "num_documents", "num_tokens",
"shards": [{"name", "documents", "tokens"}]}. Shards are written under a temporary name and renamed, so a
shard that exists is complete; a truncated or corrupt one is reported with its name when read.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

METADATA = "metadata.json"
FORMAT_VERSION = 1


def _whole(urls):
    return urls


class DataError(ValueError):
    """Bad data on disk; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def write_shard(path: Path, documents: list[np.ndarray], first_index: int) -> None:
    """Write documents (token arrays) as one tar shard, atomically."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as writer:
        for i, tokens in enumerate(documents):
            buffer = io.BytesIO()
            np.save(buffer, tokens, allow_pickle=False)
            writer.write({"__key__": f"{first_index + i:012d}", "tokens.npy": buffer.getvalue()})
    os.replace(tmp, path)


def write_metadata(out_dir: Path, metadata: dict) -> None:
    tmp = out_dir / (METADATA + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2))
    os.replace(tmp, out_dir / METADATA)


@dataclass(frozen=True)
class ShardedDataset:
    """A folder of shards described by its metadata.json."""

    path: Path
    metadata: dict

    @classmethod
    def open(cls, path: str | Path) -> "ShardedDataset":
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"data path {path} does not exist: run `megatron-refine preprocess` to create it")
        meta_file = path / METADATA
        if not meta_file.is_file():
            raise DataError(
                f"{path} has no {METADATA}: it is not a preprocessed dataset; run `megatron-refine preprocess "
                f"--input ... --output-dir {path}`"
            )
        try:
            metadata = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file} is not valid JSON ({e}): re-run preprocessing") from None
        if metadata.get("format") != FORMAT_VERSION:
            raise DataError(f"{meta_file} has format {metadata.get('format')}, expected {FORMAT_VERSION}: re-run preprocessing")
        missing = [s["name"] for s in metadata["shards"] if not (path / s["name"]).is_file()]
        if missing:
            raise DataError(f"{path} is missing shards {missing[:3]}{'...' if len(missing) > 3 else ''}: re-run preprocessing")
        if not metadata["shards"]:
            raise DataError(f"{path} holds no documents: preprocess some input first")
        return cls(path, metadata)

    @property
    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.metadata["shards"]]

    @property
    def vocab_size(self) -> int:
        return self.metadata["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.metadata["eos_id"]

    def documents(self, shard: str, skip: int = 0) -> Iterator[np.ndarray]:
        """The token arrays of one shard, in order, after skipping `skip` of them; validated as read."""
        import webdataset as wds

        path = self.path / shard
        expected = self._documents_per_shard[shard]
        read = 0
        try:
            # The loader assigns shards to DP ranks itself: read exactly this shard, unsplit.
            samples = wds.WebDataset(str(path), shardshuffle=False, empty_check=False,
                                     nodesplitter=_whole, workersplitter=_whole)
            for read, sample in enumerate(samples, 1):
                if read <= skip:
                    continue
                tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
                if tokens.size and int(tokens.max()) >= self.vocab_size:
                    raise DataError(
                        f"{path} document {sample['__key__']} has token id {int(tokens.max())} >= vocab size "
                        f"{self.vocab_size}: the shard was written with another tokenizer; re-run preprocessing"
                    )
                yield tokens
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}): re-run preprocessing") from None
        if read != expected:  # a tar cut at a member boundary reads as a shorter, valid stream
            raise DataError(
                f"shard {path} is corrupt or truncated: it holds {read} documents, {METADATA} says {expected}; "
                "re-run preprocessing"
            )

    @property
    def _documents_per_shard(self) -> dict[str, int]:
        return {s["name"]: s["documents"] for s in self.metadata["shards"]}
