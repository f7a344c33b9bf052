"""Preprocessing that cannot mislabel data: resume keyed by content and settings, --overwrite, per-shard
checksums verified on open, and input errors that name the file and line."""

import json
import os

import pytest

from megatron_refine.data import (
    ByteTokenizer,
    DataError,
    ShardedDataset,
    preprocess,
    tokenizer_from_metadata,
    write_builtin_corpus,
)
from megatron_refine.data.preprocess import main as preprocess_main

REFUSED = "preprocess into a new --output-dir, or pass --overwrite"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def write_tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    hf = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", *words, "</s>"])}, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    hf.save(str(path))
    return str(path)


def texts(out):
    ds = ShardedDataset.open(out)
    return [ByteTokenizer().decode(d) for s in ds.shard_names for d in ds.documents(s)]


def test_resume_refuses_another_tokenizer(tmp_path):
    source = str(write_jsonl(tmp_path / "a.jsonl", ["hello world", "world"]))
    out = tmp_path / "out"
    preprocess([source], out, progress=False)
    assert ShardedDataset.open(out).tokenizer_hash == "byte"
    tokenizer = write_tokenizer(tmp_path / "tokenizer.json", ["hello", "world"])
    with pytest.raises(DataError, match=rf"other settings \(tokenizer_hash 'byte' -> .*\): {REFUSED}"):
        preprocess([source], out, tokenizer=tokenizer, progress=False)
    assert ShardedDataset.open(out).tokenizer_hash == "byte"  # the folder is as it was
    hf = tmp_path / "hf"
    preprocess([source], hf, tokenizer=tokenizer, progress=False)
    recorded = ShardedDataset.open(hf).tokenizer_hash
    assert len(recorded) == 64
    write_tokenizer(tmp_path / "tokenizer.json", ["hello", "there", "world"])  # same path, other vocab
    with pytest.raises(DataError, match=rf"tokenizer_hash {recorded[:16]}\.\.\. -> "):
        preprocess([source], hf, tokenizer=tokenizer, progress=False)
    with pytest.raises(DataError, match="changed since the data was tokenized with it"):
        tokenizer_from_metadata(ShardedDataset.open(hf).metadata["tokenizer"])
    with pytest.raises(DataError, match="shard_size 10000 -> 1"):
        preprocess([source], hf, tokenizer=tokenizer, shard_size=1, progress=False)


def test_resume_refuses_changed_input_content_of_the_same_size_and_mtime(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["alpha", "beta"])
    out = tmp_path / "out"
    preprocess([str(source)], out, progress=False)
    stat = source.stat()
    source.write_text(source.read_text().replace("beta", "beth"))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the content hash can tell
    os.remove(out / "00000.done.json")  # also refused mid-run, from metadata.json's record of the input
    with pytest.raises(DataError, match=rf"input .*a.jsonl changed since it was preprocessed .*sha256 .*{REFUSED}"):
        preprocess([str(source)], out, progress=False)
    write_jsonl(tmp_path / "b.jsonl", ["gamma"])
    with pytest.raises(DataError, match="from 1 input files, this run has 2"):
        preprocess([str(source), str(tmp_path / "b.jsonl")], out, progress=False)


def test_overwrite_replaces_only_what_preprocessing_wrote(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", ["alpha", "beta", "gamma"])
    out = tmp_path / "out"
    preprocess([str(source)], out, shard_size=1, progress=False)
    (out / "notes.txt").write_text("mine")
    write_jsonl(source, ["delta"])
    with pytest.raises(DataError, match=REFUSED):
        preprocess_main(["--input", str(source), "--output-dir", str(out), "--shard-size", "1"])
    preprocess_main(["--input", str(source), "--output-dir", str(out), "--shard-size", "1", "--overwrite"])
    assert texts(out) == ["delta"]
    assert sorted(p.name for p in out.iterdir()) == ["00000-00000.tar", "00000.done.json", "metadata.json", "notes.txt"]


def test_a_flipped_byte_in_a_shard_is_caught_by_its_checksum_and_a_rerun_repairs_it(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", [f"document {i}" for i in range(6)])
    out = tmp_path / "out"
    meta = preprocess([str(source)], out, shard_size=2, progress=False)
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])
    shard = out / "00000-00001.tar"
    data = bytearray(shard.read_bytes())
    data[data.index("document 2".encode("utf-16-le")) + 18] ^= 1  # its last token (uint16): '2' -> '3', a valid tar
    shard.write_bytes(bytes(data))
    ds = ShardedDataset.open(out)
    list(ds.documents("00000-00000.tar"))
    command = f"megatron-refine preprocess --input {source} --output-dir {out} --tokenizer byte --shard-size 2"
    with pytest.raises(DataError, match=rf"shard {out}/00000-00001.tar is corrupt: its sha256 .*re-run `{command}`"):
        list(ds.documents("00000-00001.tar"))
    assert preprocess([str(source)], out, shard_size=2, progress=False) == meta  # the recorded command, again
    assert texts(out) == [f"document {i}" for i in range(6)]


def test_folders_written_before_checksums_still_load(tmp_path):
    out = tmp_path / "out"
    meta = preprocess([str(write_jsonl(tmp_path / "a.jsonl", ["alpha"]))], out, progress=False)
    old = {k: v for k, v in meta.items() if k not in ("tokenizer_hash", "preprocess")}
    old.update(format=1, shards=[{k: v for k, v in s.items() if k != "sha256"} for s in meta["shards"]])
    (out / "metadata.json").write_text(json.dumps(old))
    ds = ShardedDataset.open(out)
    assert ds.tokenizer_hash is None and texts(out) == ["alpha"]
    with pytest.raises(DataError, match=f"written by an older megatron-refine .*{REFUSED}"):
        preprocess([str(tmp_path / "a.jsonl")], out, progress=False)


def test_another_builtin_corpus_replaces_the_previous_one(tmp_path):
    assert write_builtin_corpus(tmp_path, 10, seed=0, shard_size=5, progress=False)["num_documents"] == 10
    assert write_builtin_corpus(tmp_path, 12, seed=1, shard_size=4, progress=False)["num_documents"] == 12
    assert len(texts(tmp_path)) == 12


def test_a_corpus_written_by_an_older_generator_is_regenerated(tmp_path, monkeypatch):
    import importlib

    import megatron_refine.data.corpus as corpus

    # the module: the package exports a function of the same name
    preprocess_module = importlib.import_module("megatron_refine.data.preprocess")

    write_builtin_corpus(tmp_path, 10, seed=0, shard_size=5, progress=False)
    monkeypatch.setattr(preprocess_module, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
    monkeypatch.setattr(preprocess_module, "generate_documents", lambda n, seed: (f"new {i}" for i in range(n)))
    write_builtin_corpus(tmp_path, 10, seed=0, shard_size=5, progress=False)  # same seed and size, new generator
    assert sorted(texts(tmp_path)) == sorted(f"new {i}" for i in range(10))
    version = corpus.CORPUS_VERSION + 1
    assert [p.name for p in (tmp_path / "source").glob("*.jsonl")] == [f"builtin-v{version}-seed0-10.jsonl"]


def test_input_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2 is not UTF-8 text \(byte 0xe9\)"):
        preprocess([str(tmp_path / "latin.jsonl")], tmp_path / "o", progress=False)
    (tmp_path / "latin.txt").write_bytes(b"one\ntwo\nthr\xffee\n")
    with pytest.raises(DataError, match=r"latin.txt:3 is not UTF-8 text"):
        preprocess([str(tmp_path / "latin.txt")], tmp_path / "o", progress=False)
    (tmp_path / "null.jsonl").write_text('{"text": "ok"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"null.jsonl:2 has 'text': null, not a string"):
        preprocess([str(tmp_path / "null.jsonl")], tmp_path / "o", progress=False)
    (tmp_path / "garbage.json").write_text("<html>not a tokenizer</html>")
    with pytest.raises(DataError, match=r"garbage.json is not a valid tokenizer.json"):
        preprocess([str(tmp_path / "null.jsonl")], tmp_path / "o", tokenizer=str(tmp_path / "garbage.json"),
                   progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no data here")
    with pytest.raises(DataError, match=r"input .*empty holds no .jsonl or .txt file"):
        preprocess([str(tmp_path / "empty")], tmp_path / "o", progress=False)
    with pytest.raises(DataError, match=r"input .*\*.md holds no .jsonl or .txt file|is not a .jsonl or .txt"):
        preprocess([str(tmp_path / "empty" / "*.md")], tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "metadata.json").exists()
