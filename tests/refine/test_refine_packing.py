"""REFINE on packed documents, and the health of its rollouts: positions never let a rollout cross a
document boundary; the decoder (sampling) and the training forward (scoring) agree on rollout log-probs, and
a drift between them is reported."""

import pytest
import torch
from megatron_modules import TINY_MODELS, tiny_fast_weight_model, token_batch

from megatron_refine.models.packing import Packing, packed_seq_params
from megatron_refine.refine import (
    RefineConfig,
    check_logprob_parity,
    eligible_positions,
    refine_loss,
    select_positions,
)
from megatron_refine.runtime import initialize, spawn

T = 64


def _packing(cu, B=2):
    return Packing.from_params(packed_seq_params(torch.tensor(cu)), B, T)


def test_eligible_positions_keep_margins_inside_each_document():
    packing = _packing([0, 10, 40, 64, 100, 128])  # row 0: [0, 10) [10, 40) [40, 64); row 1: [0, 36) [36, 64)
    eligible = eligible_positions(packing.position_ids, packing.sequence_ids, margin=5)
    expected = torch.zeros(2, T, dtype=torch.bool)
    for b, s, e in [(0, 0, 10), (0, 10, 40), (0, 40, 64), (1, 0, 36), (1, 36, 64)]:
        expected[b, s + 5 : e - 5] = True
    assert torch.equal(eligible, expected)


@pytest.mark.parametrize("mode", ["entropy", "uniform", "argmax", "argmin"])
def test_selection_never_crosses_a_document_boundary(mode):
    packing = _packing([0, 3, 30, 37, 64, 90, 128])
    eligible = eligible_positions(packing.position_ids, packing.sequence_ids, margin=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        entropy = torch.rand(2, T, generator=g) * 5
        positions = select_positions(entropy, n_chunks=4, k=5, margin=5, mode=mode, generator=g, eligible=eligible)
        for b in range(2):
            for c, p in enumerate(positions[b].tolist()):
                lo, hi = 5 + c * 13, (5 + (c + 1) * 13 if c < 3 else T - 5)
                if eligible[b, lo:hi].any():  # a chunk with any eligible position picks one
                    assert eligible[b, p], (b, c, p)
                    same = packing.sequence_ids[b, p : p + 6]  # the position and its k = 5 true tokens
                    assert (same == same[0]).all()


def _refine_on_packed_rows(name):
    initialize(seed=3, device="cpu")
    model = tiny_fast_weight_model(name)
    ids = token_batch(2, T + 1, seed=4)
    # Row 0: documents of 12 and 4 tokens (too short for any rollout), then one of 48; row 1: one document.
    params = packed_seq_params(torch.tensor([0, 12, 16, 64, 128]))
    cfg = RefineConfig(n_chunks=4, margin=6, k=3)
    loss, metrics = refine_loss(model, ids[:, :-1], ids[:, 1:], cfg, torch.Generator().manual_seed(0),
                                packed_seq_params=params)
    loss.backward()
    # Row 0's first chunk [6, 19) holds no position with 6 tokens of its document on both sides: no rollout.
    assert metrics["rollout_tokens"].item() == (8 - 1) * cfg.k
    return {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_refine_masks_chunks_without_an_eligible_position(name):
    metrics, = spawn(_refine_on_packed_rows, 1, name)
    # fp32 on CPU: the decoder and the training forward agree to rounding.
    assert metrics["logprob_diff_max"] < 1e-4 and abs(metrics["ratio_mean"] - 1) < 1e-5


def _perturbed_decoder(name):
    initialize(seed=5, device="cpu")
    model = tiny_fast_weight_model(name)
    ids = token_batch(2, T + 1, seed=6)
    cfg = RefineConfig(n_chunks=3, margin=6, k=4)
    _, healthy = refine_loss(model, ids[:, :-1], ids[:, 1:], cfg, torch.Generator().manual_seed(1))
    step = model.step

    def drifting_step(tokens, cache):  # a decoder bug: its logits are off by noise
        logits, hidden = step(tokens, cache)
        return logits + 0.5 * torch.randn_like(logits), hidden

    model.step = drifting_step
    _, drifted = refine_loss(model, ids[:, :-1], ids[:, 1:], cfg, torch.Generator().manual_seed(1))
    return {k: v.item() for k, v in healthy.items()}, {k: v.item() for k, v in drifted.items()}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_a_drifting_decoder_trips_the_parity_warning(name):
    (healthy, drifted), = spawn(_perturbed_decoder, 1, name)
    assert healthy["logprob_diff_max"] < 1e-4
    assert check_logprob_parity(healthy, 0.05, step=1)
    assert drifted["logprob_diff_max"] > 0.05 and drifted["ratio_mean"] != 1.0
    with pytest.warns(RuntimeWarning, match="refine.logprob_parity_tolerance"):
        assert not check_logprob_parity(drifted, 0.05, step=1)
