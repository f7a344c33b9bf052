"""Tokenizers, preprocessing into shards, the built-in corpus, and the packed loader."""

import json
import os

import pytest
import torch

from megatron_refine.data import (
    ByteTokenizer,
    DataError,
    PackedLoader,
    ShardedDataset,
    generate_documents,
    load_tokenizer,
    preprocess,
    write_builtin_corpus,
)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id]) == "héllo ✓"


def test_hf_tokenizer_json_is_used_from_disk(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    hf = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.eos_id, tok.encode("hello world")) == (4, 3, [1, 2])
    meta = preprocess([str(write_jsonl(tmp_path / "a.jsonl", ["hello world", "world"]))], tmp_path / "out",
                      tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
    assert meta["vocab_size"] == 4 and meta["tokenizer"]["type"] == "hf" and meta["num_tokens"] == 5
    with pytest.raises(FileNotFoundError, match="pass --tokenizer byte"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_builtin_corpus_is_deterministic_and_every_table_answer_was_stated():
    assert list(generate_documents(20, seed=3)) == list(generate_documents(20, seed=3))
    assert list(generate_documents(20, seed=3)) != list(generate_documents(20, seed=4))
    tables = [d for d in generate_documents(200, seed=3) if d.startswith("table:\n")]
    assert len(tables) > 100
    for doc in tables:
        stated: dict[str, list[str]] = {}
        for line in doc.splitlines()[1:]:
            if "=" in line:
                key, value = line.split("=")
                stated.setdefault(key, []).append(value)
            else:
                keys, answer = line.split("?")
                assert answer == ",".join(" ".join(stated[k]) for k in keys.split(","))
        assert sorted(k for line in doc.splitlines() if "?" in line for k in line.split("?")[0].split(",")) == \
            sorted(stated)  # every key asked back once


def test_preprocess_writes_shards_and_metadata_and_resumes(tmp_path):
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", [f"doc {i}-{j}" for j in range(7)]) for i in range(3)]
    out = tmp_path / "shards"
    meta = preprocess([str(p) for p in inputs], out, shard_size=3, workers=2, progress=False)
    assert meta["num_documents"] == 21 and len(meta["shards"]) == 9  # 3 files x ceil(7/3)
    ds = ShardedDataset.open(out)
    docs = [ByteTokenizer().decode(d) for s in ds.shard_names for d in ds.documents(s)]
    assert sorted(docs) == sorted(f"doc {i}-{j}" for i in range(3) for j in range(7))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    os.remove(out / "00001.done.json")  # as if the run had stopped while file 1 was in progress
    assert preprocess([str(p) for p in inputs], out, shard_size=3, progress=False) == meta
    changed = {p.name for p, m in mtimes.items() if p.stat().st_mtime_ns != m}
    assert changed == {"00001-00000.tar", "00001-00001.tar", "00001-00002.tar"}


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl matches no file"):
        preprocess([str(tmp_path / "missing.jsonl")], tmp_path / "o", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        preprocess([str(tmp_path / "bad.jsonl")], tmp_path / "o", progress=False)
    write_jsonl(tmp_path / "key.jsonl", ["x"])
    with pytest.raises(ValueError, match="has no key 'body': pass --json-key"):
        preprocess([str(tmp_path / "key.jsonl")], tmp_path / "o2", json_key="body", progress=False)
    with pytest.raises(DataError, match="does not exist: run `megatron-refine preprocess`"):
        ShardedDataset.open(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no metadata.json"):
        ShardedDataset.open(tmp_path)


def test_corrupt_shards_and_foreign_token_ids_name_the_file(tmp_path):
    write_builtin_corpus(tmp_path, 40, seed=0, shard_size=20, progress=False)
    ds = ShardedDataset.open(tmp_path)
    shard = tmp_path / ds.shard_names[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated
    with pytest.raises(DataError, match=rf"shard .*{shard.name} is corrupt: its sha256"):
        list(ds.documents(shard.name))
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["vocab_size"] = 100  # as if a model with a smaller vocab read byte-tokenized data
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"has token id \d+ >= vocab size 100"):
        list(ShardedDataset.open(tmp_path).documents(ds.shard_names[1]))


@pytest.fixture
def numbered_docs(tmp_path):
    """40 documents 'doc-NN;' in 8 shards."""
    preprocess([str(write_jsonl(tmp_path / "d.jsonl", [f"doc-{i:02d};" for i in range(40)]))], tmp_path / "s",
               shard_size=5, progress=False)
    return tmp_path / "s"


def _one_epoch(loader):
    counts = {s["name"]: s["documents"] for s in loader.dataset.metadata["shards"]}
    docs = [ByteTokenizer().decode(loader._next_document()) for _ in range(sum(counts[s] for s in loader.my_shards))]
    assert loader.state.epoch == 0
    loader._next_document()
    assert loader.state.epoch == 1  # the next document starts the second epoch
    return docs


def test_dp_sharding_covers_every_document_once_per_epoch(numbered_docs):
    seen = []
    for rank in range(2):
        seen += _one_epoch(PackedLoader(numbered_docs, 16, 2, dp_rank=rank, dp_size=2, seed=1))
    assert sorted(seen) == [f"doc-{i:02d};" for i in range(40)]


def test_loader_is_deterministic_packs_with_eos_and_resumes_exactly(numbered_docs):
    a = PackedLoader(numbered_docs, 16, 2, seed=5)
    batches = [a.next_batch() for _ in range(3)]
    assert (batches[0].labels[:, :-1] == batches[0].tokens[:, 1:]).all()
    assert (batches[0].tokens == ByteTokenizer.eos_id).any()  # documents are EOS-separated
    state = json.loads(json.dumps(a.state_dict()))  # it travels through a checkpoint as plain data
    after = [a.next_batch() for _ in range(12)]  # crosses into the next epoch
    b = PackedLoader(numbered_docs, 16, 2, seed=5)
    assert all((x.tokens == y.tokens).all() for x, y in zip(batches, (b.next_batch() for _ in range(3))))
    c = PackedLoader(numbered_docs, 16, 2, seed=5)
    c.load_state_dict(state)
    for x in after:
        y = c.next_batch()
        assert (x.tokens == y.tokens).all() and (x.labels == y.labels).all()
        assert (x.cu_seqlens == y.cu_seqlens).all()
    assert c.state.epoch >= 1


def test_loader_marks_every_document_start(numbered_docs):
    """cu_seqlens (over the flattened rows) starts a document exactly on each token after an EOS, and at
    every row start."""
    loader = PackedLoader(numbered_docs, 16, 2, seed=5, eod_mask_loss=True)
    eos = ByteTokenizer.eos_id
    for _ in range(10):
        batch = loader.next_batch()
        flat, cu = batch.tokens.flatten(), batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == flat.numel() and cu == sorted(set(cu))
        expected = {i for i in range(1, flat.numel()) if flat[i - 1] == eos} | {0, 16, 32}
        assert set(cu) == expected
        assert torch.equal(batch.loss_mask, (batch.tokens != eos).float())  # for data.eod_mask_loss


def test_more_dp_ranks_than_shards_is_an_error_that_names_the_fix(numbered_docs):
    with pytest.raises(DataError, match="smaller --shard-size"):
        PackedLoader(numbered_docs, 16, 2, dp_rank=0, dp_size=16)
