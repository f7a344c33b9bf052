"""Packed documents: a micro-batch row holding several documents gives, per document, the logits, gradients
and branch states of running that document alone (both mixers, TP=2 with sequence parallelism too); and the
training forward run on from a cache agrees with the decoder."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron_modules import TINY_MODELS, tiny_fast_weight_model, token_batch

from megatron_refine.models.packing import packed_seq_params
from megatron_refine.runtime import initialize, spawn

T = 40  # lact_tiny: chunk 16, window 12
DOCUMENTS = [(0, 0, 5), (0, 5, 28), (0, 28, 40), (1, 0, 40)]  # (row, start, end): short, chunk-crossing, whole row
CU_SEQLENS = torch.tensor([0, 5, 28, 40, 80])


def _alone(ids):
    """Each document at the start of its own row (the rest is padding the causal model never reads back)."""
    rows = torch.zeros(len(DOCUMENTS), T, dtype=ids.dtype)
    for i, (b, s, e) in enumerate(DOCUMENTS):
        rows[i, : e - s] = ids[b, s:e]
    return rows


def _packed_equals_separate(name, tp):
    initialize(tp=tp, seed=4, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64, sequence_parallel=tp > 1)
    ids = token_batch(2, T, seed=3)
    packed = model(ids, None, None, packed_seq_params=packed_seq_params(CU_SEQLENS))  # [B, T, V/t]
    alone = model(_alone(ids), None, None)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = list(model.parameters())
    loss_packed, loss_alone = 0, 0
    for i, (b, s, e) in enumerate(DOCUMENTS):
        torch.testing.assert_close(alone[i, : e - s], packed[b, s:e])
        loss_packed = loss_packed + (packed[b, s:e] * weights[b, s:e]).sum()
        loss_alone = loss_alone + (alone[i, : e - s] * weights[b, s:e]).sum()
    grads_packed = _full(params, torch.autograd.grad(loss_packed, params))
    grads_alone = _full(params, torch.autograd.grad(loss_alone, params))
    for (n, _), a, b in zip(model.named_parameters(), grads_packed, grads_alone):
        torch.testing.assert_close(a, b, msg=lambda m: f"{n}: {m}")
    # Not packing would differ: the documents after the first in a row would read the earlier ones. (Over the
    # whole vocabulary: a TP rank's slice may hold only padding ids, -inf either way.)
    unpacked, packed = (gather_from_tensor_model_parallel_region(x[0, 5:28]) for x in (model(ids, None, None), packed))
    assert not torch.allclose(unpacked, packed)


def _full(params, grads):
    """Sequence-parallel weights get partial gradients per TP rank; sum them, as finalize_model_grads does."""
    for p, g in zip(params, grads):
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
    return grads


@pytest.mark.parametrize("name", TINY_MODELS)
def test_packed_documents_equal_separate_runs(name):
    spawn(_packed_equals_separate, 1, name, 1)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_packed_documents_equal_separate_runs_tp2_sequence_parallel(name):
    spawn(_packed_equals_separate, 2, name, 2)


def _decode(model, tokens, cache):
    return torch.stack([model.step(tokens[:, t], cache)[0] for t in range(tokens.shape[1])], dim=1)


def _branches_of_packed_documents(name):
    initialize(seed=5, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64)
    ids = token_batch(2, T, seed=6)
    k = 4
    positions = torch.tensor([[2, 9, 30], [3, 20, 35]])  # in documents 0, 1, 2 of row 0 and document 3
    continuation = token_batch(6, k, seed=7)
    with torch.no_grad():
        cache = model.forward_with_branch_states(ids, packed_seq_params(CU_SEQLENS)).states_after(positions)
        assert cache.positions.tolist() == [3, 5, 3, 4, 21, 36]  # next position inside the document
        decoded = _decode(model, continuation, cache)
        # The same branches taken from each document run alone.
        doc_of = {(0, 2): 0, (0, 9): 1, (0, 30): 2, (1, 3): 3, (1, 20): 3, (1, 35): 3}
        rows = [(b, p) for b in range(2) for p in positions[b].tolist()]
        alone_positions = torch.tensor([p - DOCUMENTS[doc_of[(b, p)]][1] for b, p in rows])
        alone_rows = torch.tensor([doc_of[(b, p)] for b, p in rows])
        alone = model.forward_with_branch_states(_alone(ids)[alone_rows]).states_after(alone_positions[:, None])
        torch.testing.assert_close(_decode(model, continuation, alone), decoded)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_branch_states_of_packed_documents_are_each_documents_own(name):
    spawn(_branches_of_packed_documents, 1, name)


def _continuation_equals_decoder(name, tp):
    initialize(tp=tp, seed=6, device="cpu")
    model = tiny_fast_weight_model(name, sequence_parallel=tp > 1)
    ids = token_batch(2, T, seed=8)
    positions = torch.tensor([[7, 15, 26], [0, 14, 33]])  # inside LaCT chunks, at a chunk's last token
    rollout = token_batch(6, 5, seed=9)
    with torch.no_grad():
        cache = model.forward_with_branch_states(ids).states_after(positions)
        logits, hidden = model.forward_from_cache(rollout, cache)
        decoded = [model.step(rollout[:, j], cache) for j in range(5)]
    torch.testing.assert_close(logits, torch.stack([d[0] for d in decoded], 1), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hidden, torch.stack([d[1] for d in decoded], 1), atol=2e-5, rtol=1e-4)
    assert logits.shape[:2] == (6, 5) and logits.shape[2] * tp == model.vocab_size


@pytest.mark.parametrize("name", TINY_MODELS)
def test_forward_from_cache_equals_the_decoder(name):
    spawn(_continuation_equals_decoder, 1, name, 1)


def test_forward_from_cache_tp2_sequence_parallel_pads_the_length():
    spawn(_continuation_equals_decoder, 2, "lact_tiny", 2)


def test_packed_seq_params_must_cover_the_micro_batch():
    spawn(_bad_packing, 1)


def _bad_packing():
    initialize(seed=0, device="cpu")
    model = tiny_fast_weight_model("deltanet_tiny")
    with pytest.raises(ValueError, match="must run from 0 to the micro-batch's 2 x 40 tokens"):
        model(token_batch(2, T), None, None, packed_seq_params=packed_seq_params(torch.tensor([0, 5, 40])))
