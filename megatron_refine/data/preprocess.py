"""`megatron-refine preprocess` / tools/preprocess_data.py: text or jsonl -> tokenized webdataset shards.

Inputs: `.jsonl` files (one document per line, text under --json-key) and `.txt` files (one document each),
given as files, folders or globs. Each input file becomes its own shards, written in parallel across
--workers processes, and a record `NNNNN.done.json` of them. A re-run resumes: an input whose record matches
(same content: size and sha256; same tokenizer, eos, json key and shard size) and whose shards pass their
checksums is kept, a missing or corrupt shard is rewritten, and anything else that differs from what the
output folder records is refused: mixing it in would mislabel the data. --overwrite clears the folder's
shards, records and metadata.json first (only files this tool writes).
The built-in corpus goes through the same path (--builtin-corpus N writes it as jsonl first). At the end it
reports how many documents have at least 1, 2, 4, ... tokens (recorded in metadata.json too): the documents
`data.layout: documents` can use at a given sequence length.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from megatron_refine.arguments import positive_int
from megatron_refine.data.corpus import CORPUS_VERSION, generate_documents
from megatron_refine.data.shards import (
    FORMAT_VERSION,
    METADATA,
    DataError,
    describe_lengths,
    file_sha256,
    length_stats,
    merge_length_stats,
    shard_document_lengths,
    token_dtype,
    write_metadata,
    write_shard,
)
from megatron_refine.data.tokenizers import load_tokenizer

DONE = ".done.json"
SUFFIXES = (".jsonl", ".txt")
WRITTEN = re.compile(rf"(\d{{5}}-\d{{5}}\.tar|\d{{5}}{re.escape(DONE)}|{re.escape(METADATA)})(\.tmp)?")  # all it writes
FIX = "preprocess into a new --output-dir, or pass --overwrite to replace its shards"


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Input files, in order: each pattern is a file, a folder (its .jsonl / .txt files, recursively) or a glob."""
    files: list[Path] = []
    for pattern in patterns:
        matches = [Path(pattern)] if Path(pattern).exists() else sorted(Path(p) for p in glob.glob(pattern))
        if not matches:
            raise DataError(f"input {pattern} matches no file: check the path")
        found = []
        for match in matches:
            if match.is_dir():
                found += sorted(p for p in match.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            elif match.suffix in SUFFIXES:
                found.append(match)
            else:
                raise DataError(f"input {match} is not a .jsonl or .txt file: give .jsonl (one JSON document per "
                                "line) or .txt files")
        if not found:
            raise DataError(f"input {pattern} holds no .jsonl or .txt file: point --input at the files, or a folder "
                            "holding them")
        files += found
    return files


def _decode(raw: bytes, path: Path, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise DataError(f"{path}:{line} is not UTF-8 text (byte 0x{raw[e.start]:02x}): convert the file to UTF-8, "
                        "e.g. `iconv -f latin1 -t utf-8`") from None


def read_documents(path: Path, json_key: str):
    """The texts of one input; a line that cannot be read is an error naming the file and line."""
    if path.suffix == ".txt":
        text = _decode(path.read_bytes(), path, 1)
        yield text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads it
        return
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            line = _decode(raw, path, line_number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number} is not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_number} is not a JSON object: each line is one document, "
                                f'{{"{json_key}": "..."}}')
            if json_key not in record:
                raise DataError(f"{path}:{line_number} has no key {json_key!r}: pass --json-key with the text "
                                "field's name")
            if not isinstance(record[json_key], str):
                raise DataError(f"{path}:{line_number} has {json_key!r}: {json.dumps(record[json_key])[:40]}, not a "
                                "string: fix or drop that line")
            yield record[json_key]


def input_key(path: Path) -> dict:
    """What identifies an input's content (size, sha256); path and mtime are kept for people to read."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path)}


def _short(value):
    return f"{value[:16]}..." if isinstance(value, str) and len(value) == 64 else repr(value)


def _check_input(key: dict, recorded: dict, out_dir: Path) -> None:
    if (key["size"], key["sha256"]) == (recorded["size"], recorded["sha256"]):
        return
    what = "changed since it was" if key["path"] == recorded["path"] else f"is not the file {recorded['path']}"
    raise DataError(
        f"input {key['path']} {what} preprocessed into {out_dir} (size {recorded['size']} -> {key['size']}, sha256 "
        f"{_short(recorded['sha256'])} -> {_short(key['sha256'])}): {FIX}"
    )


def _process_file(path: Path, index: int, out_dir: Path, tokenizer_spec: str, eos_token: str | None,
                  json_key: str, shard_size: int, settings: dict, recorded: dict | None) -> tuple[dict, list[dict]]:
    """Tokenize one input file into shards `{index:05d}-{k:05d}.tar`, or keep the shards a matching record
    names; returns the input's key and its shards' descriptions."""
    key = input_key(path)
    if recorded is not None:
        _check_input(key, recorded, out_dir)
    done = out_dir / f"{index:05d}{DONE}"
    if done.is_file():
        shards = json.loads(done.read_text())["shards"]
        if all((out_dir / s["name"]).is_file() and file_sha256(out_dir / s["name"]) == s["sha256"] for s in shards):
            # A record from before length statistics: read them from its shards (no re-tokenizing).
            return key, [s if "documents_at_least" in s
                         else {**s, **length_stats(shard_document_lengths(out_dir / s["name"]))} for s in shards]
    for stale in out_dir.glob(f"{index:05d}-*.tar*"):  # from an interrupted attempt at this input
        if WRITTEN.fullmatch(stale.name):
            stale.unlink()
    tokenizer = load_tokenizer(tokenizer_spec, eos_token)
    dtype = token_dtype(tokenizer.vocab_size)
    shards, buffer = [], []

    def flush():
        name = f"{index:05d}-{len(shards):05d}.tar"
        sha256 = write_shard(out_dir / name, buffer, first_index=index * 10**7 + len(shards) * shard_size)
        shards.append({"name": name, "documents": len(buffer), "tokens": int(sum(d.size for d in buffer)),
                       "sha256": sha256, **length_stats([d.size for d in buffer])})
        buffer.clear()

    for text in read_documents(path, json_key):
        buffer.append(np.asarray(tokenizer.encode(text) + [tokenizer.eos_id], dtype=dtype))
        if len(buffer) == shard_size:
            flush()
    if buffer:
        flush()
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"input": key, "settings": settings, "shards": shards}))
    tmp.replace(done)
    return key, shards


def _settings(metadata: dict) -> dict:
    """What a resumed run must match, as metadata.json records it."""
    recipe = metadata["preprocess"]
    return {"format": metadata["format"], "tokenizer_hash": metadata["tokenizer_hash"], "eos_id": metadata["eos_id"],
            "json_key": recipe["json_key"], "shard_size": recipe["shard_size"]}


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): {FIX}") from None


def _recorded_inputs(out_dir: Path, files: list[Path], settings: dict) -> list[dict | None]:
    """The key each input had when out_dir was written (None: not finished then), after checking that out_dir
    was written with these settings and as many inputs."""
    meta_file = out_dir / METADATA
    metadata = _read_record(meta_file) if meta_file.is_file() else None
    records = {int(p.name[:5]): _read_record(p) for p in out_dir.glob(f"*{DONE}") if WRITTEN.fullmatch(p.name)}
    written = [(f"{i:05d}{DONE}", record.get("settings")) for i, record in sorted(records.items())]
    if metadata:
        written.append((METADATA, _settings(metadata) if metadata.get("format") == FORMAT_VERSION else None))
    for name, recorded in written:
        if recorded is None:
            raise DataError(f"{out_dir} was written by an older megatron-refine ({name} has no resume record): {FIX}")
        changed = [f"{k} {_short(recorded.get(k))} -> {_short(v)}" for k, v in settings.items() if recorded.get(k) != v]
        if changed:
            raise DataError(f"{out_dir} was preprocessed with other settings ({', '.join(changed)}): {FIX}")
    inputs = metadata["preprocess"]["inputs"] if metadata else [None] * (max(records, default=-1) + 1)
    if len(inputs) > len(files) or metadata and len(inputs) != len(files):
        raise DataError(f"{out_dir} was preprocessed from {len(inputs)} input files, this run has {len(files)}: {FIX}")
    inputs += [None] * (len(files) - len(inputs))
    return [records[i]["input"] if i in records else inputs[i] for i in range(len(files))]


def clear_output(out_dir: Path) -> None:
    """Delete what preprocessing wrote in out_dir (shards, records, metadata.json), and nothing else."""
    for path in out_dir.iterdir():
        if path.is_file() and WRITTEN.fullmatch(path.name):
            path.unlink()


def preprocess(inputs: list[str], out_dir: str | Path, *, tokenizer: str = "byte", eos_token: str | None = None,
               json_key: str = "text", shard_size: int = 10000, workers: int = 1, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Tokenize inputs into shards in out_dir and write metadata.json; returns the metadata. Resumes what a
    run with the same inputs and settings left; refuses other ones unless `overwrite`."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer, eos_token)  # fail early on a bad tokenizer
    settings = {"format": FORMAT_VERSION, "tokenizer_hash": tok.hash, "eos_id": tok.eos_id, "json_key": json_key,
                "shard_size": shard_size}
    if overwrite:
        clear_output(out)
    recorded = _recorded_inputs(out, files, settings)
    args = [(f, i, out, tokenizer, eos_token, json_key, shard_size, settings, r)
            for i, (f, r) in enumerate(zip(files, recorded))]
    with ProcessPoolExecutor(max_workers=max(1, workers)) if workers > 1 else _Serial() as pool:
        results = list(tqdm(pool.map(_process_file, *zip(*args)), total=len(args), desc="preprocess",
                            unit="file", disable=not progress))
    shards = [s for _, file_shards in results for s in file_shards]
    metadata = {
        "format": FORMAT_VERSION,
        "tokenizer": tok.describe(),
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "num_documents": sum(s["documents"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        **merge_length_stats(shards),
        "preprocess": {"eos_token": eos_token, "json_key": json_key, "shard_size": shard_size,
                       "inputs": [key for key, _ in results]},
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


def _holds_builtin_corpus(out_dir: Path) -> bool:
    """Whether every input out_dir's records name lies in its source/ folder: a generated corpus (any format)."""
    try:
        inputs = [json.loads(p.read_text())["input"] for p in out_dir.glob(f"*{DONE}")]
        paths = [i["path"] if isinstance(i, dict) else i for i in inputs]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(paths) and all(Path(p).parent == (out_dir / "source").resolve() for p in paths)


def write_builtin_corpus(out_dir: str | Path, num_documents: int, seed: int, shard_size: int = 500,
                         overwrite: bool = False, **kw) -> dict:
    """Generate the built-in corpus as jsonl under out_dir/source and preprocess it into out_dir. It is
    regenerated from its seed at will, so a folder holding another built-in corpus (other size, seed or shard
    size) is rewritten rather than refused; one holding other data is refused as `preprocess` does."""
    source = Path(out_dir) / "source"
    source.mkdir(parents=True, exist_ok=True)
    # Named by the generator's version too: a folder written by an older generator is rewritten, not reused.
    jsonl = source / f"builtin-v{CORPUS_VERSION}-seed{seed}-{num_documents}.jsonl"
    if not jsonl.is_file():
        for stale in source.glob("builtin-*.jsonl"):
            stale.unlink()
        tmp = jsonl.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for text in generate_documents(num_documents, seed):
                f.write(json.dumps({"text": text}) + "\n")
        tmp.replace(jsonl)
    try:
        return preprocess([str(jsonl)], out_dir, shard_size=shard_size, overwrite=overwrite, **kw)
    except DataError:
        if overwrite or not _holds_builtin_corpus(Path(out_dir)):
            raise
        return preprocess([str(jsonl)], out_dir, shard_size=shard_size, overwrite=True, **kw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="*", default=[], help=".jsonl / .txt files, folders or globs")
    parser.add_argument("--output-dir", required=True, help="where the shards and metadata.json go")
    parser.add_argument("--tokenizer", default="byte", help="'byte' (built in) or the path of a tokenizer.json")
    parser.add_argument("--eos-token", help="name of the end-of-document token of a tokenizer.json")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--shard-size", type=positive_int, default=10000, help="documents per shard")
    parser.add_argument("--workers", type=positive_int, default=1, help="input files processed in parallel")
    parser.add_argument("--builtin-corpus", type=positive_int, metavar="N", help="write N documents of the built-in corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus")
    parser.add_argument("--overwrite", action="store_true",
                        help="first delete the shards, records and metadata.json that --output-dir holds (a re-run "
                             "otherwise resumes, and refuses other inputs or settings)")


def run(args: argparse.Namespace) -> dict:
    common = dict(tokenizer=args.tokenizer, eos_token=args.eos_token, workers=args.workers,
                  overwrite=args.overwrite)
    if args.builtin_corpus:
        meta = write_builtin_corpus(args.output_dir, args.builtin_corpus, args.seed, shard_size=args.shard_size, **common)
    elif args.input:
        meta = preprocess(args.input, args.output_dir, json_key=args.json_key, shard_size=args.shard_size, **common)
    else:
        raise SystemExit("give --input files, or --builtin-corpus N")
    print(f"{meta['num_documents']:,d} documents, {meta['num_tokens']:,d} tokens in {len(meta['shards'])} shards "
          f"-> {Path(args.output_dir) / METADATA}")
    # How many documents `data.layout: documents` can use at each sequence length (it needs seq_length + 1 tokens).
    print(f"documents with at least N tokens (EOS included): {describe_lengths(meta)}")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
