"""Tokenizers: a built-in byte-level one that needs no files, and any Hugging Face `tokenizer.json`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from megatron_refine.data.shards import DataError

EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    hash: str  # what the data records as its tokenizer_hash

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids) -> str: ...
    def describe(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; 256 is end-of-document."""

    vocab_size = 257
    eos_id = 256
    hash = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json), loaded from disk only."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found: pass --tokenizer byte, or the path of a tokenizer.json"
            )
        # Absolute but not resolved: the folder as named holds the tokenizer's other files (a tokenizer.json of the
        # Hugging Face cache links into blobs/, where they are not).
        self.path = path.absolute()
        data = self.path.read_bytes()  # hashed and parsed from the same bytes
        try:
            self._tok = _Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{self.path} is not a valid tokenizer.json ({reason}): pass the tokenizer.json of a Hugging Face "
                "tokenizer, or --tokenizer byte"
            ) from None
        self.hash = hashlib.sha256(data).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = [eos_token] if eos_token else list(EOS_CANDIDATES)
        ids = [self._tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(
                f"{self.path} has no end-of-document token among {names}: pass --eos-token with its name"
            )
        self.eos_id = found[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"type": "hf", "path": str(self.path), "sha256": self.hash, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id}


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """"byte", or the path of a tokenizer.json (or of the folder holding it)."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec, eos_token)


def tokenizer_from_metadata(description: dict) -> Tokenizer:
    """The tokenizer a metadata.json describes; refused if its file changed since the data was tokenized."""
    if description["type"] == "byte":
        return ByteTokenizer()
    tokenizer = HFTokenizer(description["path"])
    if description.get("sha256", tokenizer.hash) != tokenizer.hash:
        raise DataError(
            f"{tokenizer.path} changed since the data was tokenized with it (sha256 {description['sha256'][:16]}... "
            f"-> {tokenizer.hash[:16]}...): restore that file, or preprocess the data again with this one"
        )
    return tokenizer
