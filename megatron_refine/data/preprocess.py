"""`megatron-refine preprocess` / tools/preprocess_data.py: text or jsonl -> tokenized webdataset shards.

Inputs: `.jsonl` files (one document per line, text under --json-key) and `.txt` files (one document each),
given as files, folders or globs. Each input file becomes its own shards, written in parallel across
--workers processes; an input whose shards are complete is skipped on a re-run (resumable).
The built-in corpus goes through the same path (--builtin-corpus N writes it as jsonl first).
"""

from __future__ import annotations

import argparse
import glob
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from megatron_refine.data.corpus import generate_documents
from megatron_refine.data.shards import FORMAT_VERSION, METADATA, token_dtype, write_metadata, write_shard
from megatron_refine.data.tokenizers import load_tokenizer

DONE = ".done.json"


def expand_inputs(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt"))
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"input {pattern} matches no file: check the path")
            files += matches
    bad = [str(f) for f in files if f.suffix not in (".jsonl", ".txt")]
    if bad:
        raise ValueError(f"unsupported input files {bad}: give .jsonl (one JSON document per line) or .txt files")
    return files


def read_documents(path: Path, json_key: str):
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number} is not valid JSON ({e})") from None
            if json_key not in record:
                raise ValueError(f"{path}:{line_number} has no key {json_key!r}: pass --json-key with the text field's name")
            yield record[json_key]


def _process_file(path: Path, index: int, out_dir: Path, tokenizer_spec: str, eos_token: str | None,
                  json_key: str, shard_size: int) -> list[dict]:
    """Tokenize one input file into shards `{index:05d}-{k:05d}.tar`; returns their descriptions."""
    done = out_dir / f"{index:05d}{DONE}"
    if done.is_file():
        recorded = json.loads(done.read_text())
        if recorded["input"] == str(path.resolve()):
            return recorded["shards"]
    tokenizer = load_tokenizer(tokenizer_spec, eos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    shards, buffer = [], []

    def flush():
        name = f"{index:05d}-{len(shards):05d}.tar"
        write_shard(out_dir / name, buffer, first_index=index * 10**7 + len(shards) * shard_size)
        shards.append({"name": name, "documents": len(buffer), "tokens": int(sum(d.size for d in buffer))})
        buffer.clear()

    for text in read_documents(path, json_key):
        buffer.append(np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=dtype))
        if len(buffer) == shard_size:
            flush()
    if buffer:
        flush()
    done.write_text(json.dumps({"input": str(path.resolve()), "shards": shards}))
    return shards


def preprocess(inputs: list[str], out_dir: str | Path, *, tokenizer: str = "byte", eos_token: str | None = None,
               json_key: str = "text", shard_size: int = 10000, workers: int = 1, progress: bool = True) -> dict:
    """Tokenize inputs into shards in out_dir and write metadata.json; returns the metadata."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, eos_token)  # fail early on a bad tokenizer
    args = [(f, i, out, tokenizer, eos_token, json_key, shard_size) for i, f in enumerate(files)]
    with ProcessPoolExecutor(max_workers=max(1, workers)) if workers > 1 else _Serial() as pool:
        results = list(tqdm(pool.map(_process_file, *zip(*args)), total=len(args), desc="preprocess",
                            unit="file", disable=not progress))
    shards = [s for file_shards in results for s in file_shards]
    metadata = {
        "format": FORMAT_VERSION,
        "tokenizer": tok.describe(),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "num_documents": sum(s["documents"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }
    write_metadata(out, metadata)
    return metadata


class _Serial:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables):
        return map(fn, *iterables)


def write_builtin_corpus(out_dir: str | Path, num_documents: int, seed: int, shard_size: int = 500, **kw) -> dict:
    """Generate the built-in corpus as jsonl under out_dir/source and preprocess it into out_dir."""
    source = Path(out_dir) / "source"
    source.mkdir(parents=True, exist_ok=True)
    jsonl = source / f"builtin-seed{seed}-{num_documents}.jsonl"
    if not jsonl.is_file():
        tmp = jsonl.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for text in generate_documents(num_documents, seed):
                f.write(json.dumps({"text": text}) + "\n")
        tmp.replace(jsonl)
    return preprocess([str(jsonl)], out_dir, shard_size=shard_size, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="*", default=[], help=".jsonl / .txt files, folders or globs")
    parser.add_argument("--output-dir", required=True, help="where the shards and metadata.json go")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (built in) or the path of a tokenizer.json")
    parser.add_argument("--eos-token", help="name of the end-of-document token of a tokenizer.json")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--shard-size", type=int, default=10000, help="documents per shard")
    parser.add_argument("--workers", type=int, default=1, help="input files processed in parallel")
    parser.add_argument("--builtin-corpus", type=int, metavar="N", help="write N documents of the built-in corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus")


def run(args: argparse.Namespace) -> dict:
    common = dict(tokenizer=args.tokenizer, eos_token=args.eos_token, workers=args.workers)
    if args.builtin_corpus:
        meta = write_builtin_corpus(args.output_dir, args.builtin_corpus, args.seed, shard_size=args.shard_size, **common)
    elif args.input:
        meta = preprocess(args.input, args.output_dir, json_key=args.json_key, shard_size=args.shard_size, **common)
    else:
        raise SystemExit("give --input files, or --builtin-corpus N")
    print(f"{meta['num_documents']:,d} documents, {meta['num_tokens']:,d} tokens in {len(meta['shards'])} shards "
          f"-> {Path(args.output_dir) / METADATA}")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
