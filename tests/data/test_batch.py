"""Every loader yields one `Batch`: the same fields, shaped alike, filled from its layout and data flags."""

import json

import pytest
import torch

from megatron_refine.data import (
    Batch, ByteTokenizer, DocumentLoader, PackedLoader, PromptAnswerDataset, PromptAnswerLoader, write_builtin_corpus)

T, B = 24, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus")
    write_builtin_corpus(path, 16, seed=0, shard_size=8, progress=False)
    return path


def _prompt_answer(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": "abcdef", "answer": "XY"}, {"prompt": "0123", "answer": "Z"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return PromptAnswerLoader(PromptAnswerDataset.open(path, ByteTokenizer(), T, 4), T, B)


def _loaders(shards, tmp_path):
    """(loader, the fields it fills); the rest are None."""
    return [
        (PackedLoader(shards, T, B), {"cu_seqlens"}),
        (PackedLoader(shards, T, B, eod_mask_loss=True, reset_at_document_boundaries=False), {"loss_mask"}),
        (DocumentLoader(shards, T, B), set()),
        (DocumentLoader(shards, T, B, min_document_tokens=4, pad_short_documents=True),
         {"loss_mask", "branch_lengths"}),
        (_prompt_answer(tmp_path), {"loss_mask", "update_mask", "branch_lengths"}),
    ]


def test_every_loader_yields_a_batch_that_says_what_to_train_on(shards, tmp_path):
    for loader, filled in _loaders(shards, tmp_path):
        batch = loader.next_batch()
        assert isinstance(batch, Batch), loader.layout
        assert batch.tokens.shape == batch.labels.shape == (B, T) and batch.tokens.dtype == torch.int64
        optional = {"loss_mask": (B, T), "update_mask": (B, T), "branch_lengths": (B,)}
        assert {k for k in [*optional, "cu_seqlens"] if getattr(batch, k) is not None} == filled, loader.layout
        for name, shape in optional.items():
            assert name not in filled or getattr(batch, name).shape == shape
        if batch.cu_seqlens is not None:  # packed: the row starts among the document starts
            assert set(range(0, (B + 1) * T, T)) <= set(batch.cu_seqlens.tolist())
        # The update trains on the prompt where there is one, else on the loss mask's labels.
        update = batch.update_mask if "update_mask" in filled else batch.loss_mask
        assert batch.update_loss_mask is update
        assert batch.mean_over_step == (loader.layout == "prompt_answer")  # prompts of any lengths weigh alike
        assert batch.to(torch.device("cpu")).tokens is batch.tokens


def test_the_flags_change_the_masks_not_the_tokens(shards):
    plain, flagged = PackedLoader(shards, T, B, seed=1), PackedLoader(shards, T, B, seed=1, eod_mask_loss=True)
    for _ in range(3):
        x, y = plain.next_batch(), flagged.next_batch()
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.cu_seqlens, y.cu_seqlens)
        assert torch.equal(y.loss_mask, (y.tokens != ByteTokenizer.eos_id).float())
    assert plain.state_dict() == flagged.state_dict()  # the same data position
