"""data.layout=documents: one document per row (DocumentLoader), and the length statistics preprocessing records."""

import json
import math

import numpy as np
import pytest
import torch

from megatron_refine.data import (
    ByteTokenizer,
    DataError,
    DocumentLoader,
    PackedLoader,
    ShardedDataset,
    preprocess,
    write_builtin_corpus,
)
from megatron_refine.data.preprocess import main as preprocess_main

SEQ = 16  # rows are SEQ + 1 = 17 tokens of one document
EOS = ByteTokenizer.eos_id


def _text(i):
    """Document i: 'doc-NN;' then filler, 9 to 37 tokens with its EOS: some shorter than a row, some longer."""
    return f"doc-{i:02d};" + "abcdefghijklmnopqrstuvwxyz0123456789"[: (i * 7) % 29 + 1]


@pytest.fixture
def varied_docs(tmp_path):
    """40 documents of varied lengths in 8 shards; returns (folder, source token arrays by document name)."""
    texts = [_text(i) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([str(tmp_path / "d.jsonl")], tmp_path / "s", shard_size=5, progress=False)
    return tmp_path / "s", {t[:7]: np.asarray(ByteTokenizer().encode(t) + [EOS]) for t in texts}


def _rows(batch):
    """The SEQ + 1 tokens of each row: its inputs and the last label."""
    return torch.cat([batch.tokens, batch.labels[:, -1:]], dim=1).numpy()


def _name(row):
    return bytes(row[:7].tolist()).decode()


def test_each_row_is_one_document_from_its_first_token_truncated_and_short_ones_are_skipped(varied_docs):
    """Against the documents in the order this seed reads them (the packed loader's stream): the rows are the
    long-enough ones, from their first token, cut to SEQ + 1 tokens, on into the next epoch; `skipped` counts
    the others exactly."""
    path, source = varied_docs
    stream = PackedLoader(path, SEQ, 1, seed=3)
    loader = DocumentLoader(path, SEQ, 2, seed=3, eod_mask_loss=True)  # eod_mask_loss: the mask though all ones
    skipped, truncated = 0, 0
    for _ in range(20):  # 40 rows: more than one epoch holds
        batch = loader.next_batch()
        assert (batch.labels[:, :-1] == batch.tokens[:, 1:]).all()
        assert batch.cu_seqlens is None  # no document boundary inside a row
        assert (batch.loss_mask == 1).all()  # nothing padded
        for row in _rows(batch):
            document = stream._next_document()
            while document.size < SEQ + 1:
                skipped, document = skipped + 1, stream._next_document()
            assert _name(row) == _name(document)
            np.testing.assert_array_equal(row, source[_name(row)][: SEQ + 1])
            truncated += document.size > SEQ + 1
        assert loader.state.skipped == skipped
    assert loader.state.epoch == 1 and skipped > sum(d.size < SEQ + 1 for d in source.values()) and truncated


def test_resumes_exactly_from_its_state(varied_docs):
    path, _ = varied_docs
    a = DocumentLoader(path, SEQ, 2, seed=5, eod_mask_loss=True)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it travels through a checkpoint as plain data
    after = [a.next_batch() for _ in range(12)]  # crosses into the next epoch
    b = DocumentLoader(path, SEQ, 2, seed=5, eod_mask_loss=True)
    b.load_state_dict(state)
    for x in after:
        y = b.next_batch()
        assert all(torch.equal(getattr(x, k), getattr(y, k)) for k in ("tokens", "labels", "loss_mask"))
        assert x.cu_seqlens is y.cu_seqlens is None
    assert b.state == a.state and b.state.epoch >= 1
    with pytest.raises(ValueError, match="resume with the data.layout the checkpoint was trained with"):
        DocumentLoader(path, SEQ, 2).load_state_dict(PackedLoader(path, SEQ, 2).state_dict())
    with pytest.raises(ValueError, match="data.layout=packed"):
        PackedLoader(path, SEQ, 2).load_state_dict(state)


def _one_epoch(loader):
    rows = []
    while True:
        row = loader.next_sample()
        if loader.state.epoch == 1:
            return rows
        rows.append(_name(row))


def test_dp_ranks_read_disjoint_documents_that_together_make_one_ranks_epoch(varied_docs):
    path, _ = varied_docs
    ranks = [_one_epoch(DocumentLoader(path, SEQ, 2, dp_rank=r, dp_size=2, seed=1)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and all(ranks)
    assert sorted(ranks[0] + ranks[1]) == sorted(_one_epoch(DocumentLoader(path, SEQ, 2, seed=1)))


def test_short_documents_are_padded_with_no_loss_on_the_padding(varied_docs):
    path, source = varied_docs
    loader = DocumentLoader(path, SEQ, 2, min_document_tokens=12, pad_short_documents=True, seed=2)
    padded = 0
    for _ in range(20):
        batch = loader.next_batch()
        for row, labels, mask in zip(_rows(batch), batch.labels, batch.loss_mask):
            document = source[_name(row)]
            n = min(document.size, SEQ + 1)
            assert document.size >= 12
            np.testing.assert_array_equal(row[:n], document[:n])
            assert (row[n:] == EOS).all()
            # Loss on every label inside the document (its EOS included), none on a label that is padding.
            assert mask.tolist() == [1.0] * (n - 1) + [0.0] * (SEQ + 1 - n)
            padded += n < SEQ + 1
    assert padded and loader.state.skipped == sum(d.size < 12 for d in source.values())  # one epoch read


def test_data_with_no_document_long_enough_fails_at_once_naming_the_histogram_and_the_fix(varied_docs):
    path, _ = varied_docs
    with pytest.raises(DataError, match=r"has the 101 tokens .* >=16: \d+, >=32: \d+ .*Lower data.seq_length"):
        DocumentLoader(path, 100, 2)
    with pytest.raises(ValueError, match="unless pad_short_documents"):
        DocumentLoader(path, SEQ, 2, min_document_tokens=8)
    # A folder preprocessed before length statistics: the loader finds out after an epoch of short documents.
    meta = json.loads((path / "metadata.json").read_text())
    for entry in [meta, *meta["shards"]]:
        del entry["max_document_tokens"], entry["documents_at_least"]
    loader = DocumentLoader(ShardedDataset(path, meta), 100, 2)
    with pytest.raises(DataError, match="not recorded .* Lower data.seq_length"):
        loader.next_batch()


def test_preprocessing_records_and_reports_document_lengths(varied_docs, tmp_path, capsys):
    path, source = varied_docs
    meta = json.loads((path / "metadata.json").read_text())
    sizes = [d.size for d in source.values()]
    assert meta["max_document_tokens"] == max(sizes) == 37
    assert meta["documents_at_least"] == {str(p): sum(s >= p for s in sizes) for p in (1, 2, 4, 8, 16, 32)}
    for shard in meta["shards"]:
        assert sum(shard["documents_at_least"].values()) >= shard["documents"] == shard["documents_at_least"]["1"]
    # The command prints them; a folder written before them gets them by re-running it (no shard rewritten).
    records = sorted(path.glob("*.done.json"))
    for record in records:
        data = json.loads(record.read_text())
        for shard in data["shards"]:
            del shard["max_document_tokens"], shard["documents_at_least"]
        record.write_text(json.dumps(data))
    mtimes = {p: p.stat().st_mtime_ns for p in path.glob("*.tar")}
    preprocess_main(["--input", str(tmp_path / "d.jsonl"), "--output-dir", str(path), "--shard-size", "5"])
    assert json.loads((path / "metadata.json").read_text()) == meta
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    out = capsys.readouterr().out
    assert f">=16: {meta['documents_at_least']['16']}, >=32: {meta['documents_at_least']['32']} (longest 37)" in out


# Through the trainer: the built-in corpus's documents are 150 to 320 bytes.
TRAIN_SEQ = 192


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(path, 40, seed=0, shard_size=10, progress=False)
    return str(path)


def _config(corpus, *extra):
    from megatron_refine.training import load_config

    return load_config("tiny-deltanet", [
        f"data.path={corpus}", f"data.seq_length={TRAIN_SEQ}", "data.micro_batch_size=2", "data.global_batch_size=4",
        "data.layout=documents", "optimizer.warmup_steps=0", "logging.log_interval=100", "device=cpu", *extra,
    ])


def _padded_step(corpus):
    """One trainer step on padded rows: its loss is the mean over the document tokens only, with no packing."""
    from megatron_refine.training import setup, train_step

    trainer = setup(_config(corpus, "data.min_document_tokens=170", "data.pad_short_documents=true"))
    batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
    while not any((b.loss_mask == 0).any() for b in batches):  # a padded row in this step
        batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
    with torch.no_grad():  # at initialisation every token's loss is about log V: spread them so the mask matters
        trainer.module.output_layer.weight.normal_(0, 1)
    expected, unmasked = [], []
    with torch.no_grad():
        for b in batches:
            per_token = trainer.module(b.tokens, None, None, labels=b.labels)
            expected.append(((per_token * b.loss_mask).sum() / b.loss_mask.sum()).item())
            unmasked.append(per_token.mean().item())
    result = train_step(trainer, batches)
    return result.loss, sum(expected) / len(expected), sum(unmasked) / len(unmasked), trainer.loader.state.skipped


def _setup(cfg):
    from megatron_refine.training import setup

    setup(cfg)


def test_a_training_step_on_padded_document_rows_masks_the_padding(corpus):
    from megatron_refine.runtime import RankFailed, spawn

    loss, expected, unmasked, skipped = spawn(_padded_step, 1, corpus)[0]
    assert math.isfinite(loss) and math.isclose(loss, expected, rel_tol=1e-6)
    assert not math.isclose(loss, unmasked, rel_tol=1e-5)
    assert skipped > 0  # documents under 170 tokens
    with pytest.raises(RankFailed, match=r"has the 1025 tokens that data.layout=documents needs .*Lower"):
        spawn(_setup, 1, _config(corpus, "data.seq_length=1024"))


def _refine_step(corpus):
    from megatron_refine.training import train

    result = train(_config(corpus, "train_steps=1", "stage=refine-mid", "refine.every=1", "refine.n_chunks=2",
                           "refine.margin=5", "refine.k=3"))
    return result.losses, result.refine_history


def test_a_refine_step_runs_on_document_rows(corpus):
    from megatron_refine.runtime import spawn

    losses, history = spawn(_refine_step, 1, corpus)[0]
    assert math.isfinite(losses[0]) and history[0]["rollout_tokens"] == 4 * 2 * 3  # 4 rows x 2 positions x k


@pytest.mark.parametrize("items, message", [
    (["data.layout=rows"], r"data.layout must be one of \('packed', 'documents', 'prompt_answer'\), got 'rows'"),
    (["data.pad_short_documents=true"], "apply to data.layout=documents: set data.layout=documents"),
    (["data.layout=documents", "data.min_document_tokens=1"], r"must be >= 2 .* leave it unset for"),
    (["data.layout=documents", "data.min_document_tokens=100"], "set data.pad_short_documents=true to pad"),
    (["data.layout=documents", "data.min_document_tokens=100", "data.pad_short_documents=true", "stage=refine-mid"],
     "would branch rollouts inside the padding"),
])
def test_bad_document_layout_settings_name_the_fix(items, message):
    from megatron_refine.training import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, items)


def test_padding_with_nothing_to_pad_is_accepted():
    from megatron_refine.training import load_config

    for extra in ([], ["data.min_document_tokens=1000"]):  # min_document_tokens unset, or above seq_length + 1
        cfg = load_config(None, ["data.layout=documents", "data.pad_short_documents=true", "stage=refine-mid", *extra])
        assert cfg.data.layout == "documents" and cfg.data.pad_short_documents
