"""Tokenized webdataset shards: one tar sample per document (`tokens.npy`), and `metadata.json` beside them.

metadata.json (format 2): {"format": 2, "tokenizer": {...}, "tokenizer_hash", "vocab_size", "eos_id",
"num_documents", "num_tokens", "max_document_tokens", "documents_at_least", "preprocess": {"eos_token", "json_key",
"shard_size", "inputs": [{"path", "size", "mtime_ns", "sha256"}]}, "shards": [{"name", "documents", "tokens",
"sha256", "max_document_tokens", "documents_at_least"}]}. `documents_at_least` counts the documents with at least
each power of two of tokens (EOS included): {"1": n, "2": n, ..., "16384": n}, what `data.layout: documents`
can use at a given sequence length (older folders lack both length fields). `preprocess` is what a resumed
run must match and the command that rewrites the folder; each shard's sha256 is computed as it is written and
checked when the loader first opens it. Format-1 folders (written before checksums) still load, unverified, with
`tokenizer_hash` None; preprocessing does not resume into them (`--overwrite` rewrites them). Shards are written
under a temporary name and renamed, so a shard that exists is complete; a truncated or corrupt one is reported
with its name and the command that regenerates it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

METADATA = "metadata.json"
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_VERIFIED: set[tuple] = set()  # shards whose checksum this process has checked: (path, sha256, size, mtime_ns)


def _whole(urls):
    return urls


class DataError(ValueError):
    """Bad data on disk; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _HashingFile:
    """Write-only view of a binary file that hashes (sha256) what goes through it."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def write_shard(path: Path, documents: list[np.ndarray], first_index: int) -> str:
    """Write documents (token arrays) as one tar shard, atomically; returns its sha256 (hex)."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _HashingFile(f)
        with wds.TarWriter(hashing, mtime=0) as writer:  # stream mode: the tar only ever calls write()
            for i, tokens in enumerate(documents):
                buffer = io.BytesIO()
                np.save(buffer, tokens, allow_pickle=False)
                writer.write({"__key__": f"{first_index + i:012d}", "tokens.npy": buffer.getvalue()})
    os.replace(tmp, path)
    return hashing.sha256.hexdigest()


def length_stats(lengths: list[int]) -> dict:
    """The longest document and how many documents have at least 1, 2, 4, ... tokens (up to the longest)."""
    sizes = np.asarray(lengths, dtype=np.int64)
    longest = int(sizes.max(initial=0))
    at_least = {str(1 << i): int((sizes >= 1 << i).sum()) for i in range(longest.bit_length())}
    return {"max_document_tokens": longest, "documents_at_least": at_least}


def merge_length_stats(parts: list[dict]) -> dict:
    """`length_stats` of several shards, summed; {} when one of them predates length statistics."""
    if not all("documents_at_least" in p for p in parts):
        return {}
    at_least: dict[str, int] = {}
    for part in parts:
        for size, count in part["documents_at_least"].items():
            at_least[size] = at_least.get(size, 0) + count
    return {"max_document_tokens": max((p["max_document_tokens"] for p in parts), default=0),
            "documents_at_least": dict(sorted(at_least.items(), key=lambda item: int(item[0])))}


def describe_lengths(stats: dict) -> str:
    """'>=1: 40, ..., >=16K: 3 (longest 20,001)' from `length_stats`; what an older folder lacks, said so."""
    if "documents_at_least" not in stats:
        return "not recorded (preprocessed by an older version: re-running its preprocess command adds them)"
    sizes = {int(size): count for size, count in stats["documents_at_least"].items()}
    counts = ", ".join(f">={f'{s // 1024}K' if s >= 1024 else s}: {count:,d}" for s, count in sizes.items())
    return f"{counts} (longest {stats['max_document_tokens']:,d})"


def shard_document_lengths(path: Path) -> list[int]:
    """The token count of every document in a shard, read from the tar directly (no metadata needed)."""
    with tarfile.open(path) as tar:
        return [np.load(io.BytesIO(tar.extractfile(m).read()), allow_pickle=False).size
                for m in tar if m.name.endswith(".tokens.npy")]


def write_metadata(out_dir: Path, metadata: dict) -> None:
    tmp = out_dir / (METADATA + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2))
    os.replace(tmp, out_dir / METADATA)


def preprocess_command(out_dir: str | Path, metadata: dict | None = None, *, overwrite: bool = False,
                       shard_size: int | None = None) -> str:
    """The `megatron-refine preprocess` command that writes out_dir again, with the values its metadata records
    (`...` where it records none); `shard_size` replaces the recorded one."""
    meta = metadata or {}
    recipe, tokenizer = meta.get("preprocess") or {}, meta.get("tokenizer") or {}
    inputs = " ".join(shlex.quote(i["path"]) for i in recipe.get("inputs", [])) or "..."
    tok = shlex.quote(tokenizer.get("path", "...")) if tokenizer.get("type") != "byte" else "byte"
    command = f"megatron-refine preprocess --input {inputs} --output-dir {shlex.quote(str(out_dir))} --tokenizer {tok}"
    if recipe.get("eos_token"):
        command += f" --eos-token {shlex.quote(recipe['eos_token'])}"
    if recipe.get("json_key", "text") != "text":
        command += f" --json-key {shlex.quote(recipe['json_key'])}"
    if shard_size or recipe.get("shard_size"):
        command += f" --shard-size {shard_size or recipe['shard_size']}"
    return command + (" --overwrite" if overwrite else "")


def _rerun(out_dir: Path, metadata: dict | None) -> str:
    """How to rewrite missing or corrupt shards: re-running the recorded command redoes only them (a resumed run
    checks every shard); a folder without resume records (format 1, unreadable metadata) is rewritten whole."""
    resumable = bool(metadata) and metadata.get("format") == FORMAT_VERSION
    return f"re-run `{preprocess_command(out_dir, metadata, overwrite=not resumable)}`"


@dataclass(frozen=True)
class ShardedDataset:
    """A folder of shards described by its metadata.json."""

    path: Path
    metadata: dict

    @classmethod
    def open(cls, path: str | Path) -> "ShardedDataset":
        path = Path(path)
        if not path.is_dir():
            raise DataError(
                f"data path {path} does not exist: run `megatron-refine preprocess` to create it, e.g. "
                f"`{preprocess_command(path)}`"
            )
        meta_file = path / METADATA
        if not meta_file.is_file():
            raise DataError(
                f"{path} has no {METADATA}: it is not a preprocessed dataset; run `{preprocess_command(path)}`"
            )
        try:
            metadata = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file} is not valid JSON ({e}): {_rerun(path, None)}") from None
        if metadata.get("format") not in READABLE_FORMATS:
            raise DataError(
                f"{meta_file} has format {metadata.get('format')}, this version reads formats {READABLE_FORMATS}: "
                f"{_rerun(path, None)}"
            )
        missing = [s["name"] for s in metadata["shards"] if not (path / s["name"]).is_file()]
        if missing:
            raise DataError(
                f"{path} is missing shards {missing[:3]}{'...' if len(missing) > 3 else ''}: {_rerun(path, metadata)}"
            )
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

    @property
    def tokenizer_hash(self) -> str | None:
        """sha256 of the tokenizer.json the data was tokenized with ("byte" for the byte tokenizer); None for a
        folder written before metadata recorded it (format 1)."""
        return self.metadata.get("tokenizer_hash")

    @property
    def tokenizer_description(self) -> dict | None:
        """The tokenizer the data was tokenized with, as `tokenizers.tokenizer_from_metadata` reads it."""
        return self.metadata.get("tokenizer")

    @property
    def content_hash(self) -> str:
        """sha256 of the shards metadata.json lists (names, sizes, sha256s): what a data position indexes, which a
        re-preprocessing into the same folder changes."""
        return hashlib.sha256(json.dumps(self.metadata["shards"], sort_keys=True).encode()).hexdigest()

    def preprocess_command(self, **changes) -> str:
        """The command that rewrites this folder (see `preprocess_command`)."""
        return preprocess_command(self.path, self.metadata, **changes)

    def verify(self, shard: str) -> None:
        """Check a shard against the sha256 metadata.json records for it, once per process (format 1: none)."""
        path, expected = self.path / shard, self._shards[shard].get("sha256")
        if expected is None:
            return
        if not path.is_file():
            raise DataError(f"shard {path} is missing: {_rerun(self.path, self.metadata)}")
        stat = path.stat()
        key = (str(path.resolve()), expected, stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED:
            return
        actual = file_sha256(path)
        if actual != expected:
            raise DataError(
                f"shard {path} is corrupt: its sha256 is {actual[:16]}..., {METADATA} records {expected[:16]}...; "
                f"regenerate it: {_rerun(self.path, self.metadata)}"
            )
        _VERIFIED.add(key)

    def documents(self, shard: str, skip: int = 0) -> Iterator[np.ndarray]:
        """The token arrays of one shard, in order, after skipping `skip` of them; checksummed when first opened
        and validated as read."""
        import webdataset as wds

        path = self.path / shard
        self.verify(shard)
        expected = self._shards[shard]["documents"]
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
                        f"{self.vocab_size}: the shard and {METADATA} disagree on the tokenizer; rewrite the folder: "
                        f"`{self.preprocess_command(overwrite=True)}`"
                    )
                yield tokens
        except (tarfile.TarError, OSError, ValueError, KeyError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(
                f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}): {_rerun(self.path, self.metadata)}"
            ) from None
        if read != expected:  # a tar cut at a member boundary reads as a shorter, valid stream
            raise DataError(
                f"shard {path} is corrupt or truncated: it holds {read} documents, {METADATA} says {expected}; "
                f"{_rerun(self.path, self.metadata)}"
            )

    @property
    def _shards(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.metadata["shards"]}
