"""Cached decoding and branch states: token-by-token decoding equals the full forward; decoding from a
branch state equals decoding after the prefix; gradients through a branch equal those of a prefix re-run."""

import pytest
import torch
from megatron_modules import TINY_MODELS, VOCAB, assert_gradients_close, tiny_fast_weight_model, token_batch

from megatron_refine.models import generate, sample_tokens
from megatron_refine.runtime import initialize, spawn

# lact_tiny: chunk 16, window 12. T = 40 crosses two chunk updates and the window.
T = 40


def _decode(model, tokens, cache):
    return torch.stack([model.step(tokens[:, t], cache)[0] for t in range(tokens.shape[1])], dim=1)


def _decode_from_scratch_equals_forward(name):
    initialize(seed=1, device="cpu")
    model = tiny_fast_weight_model(name)
    ids = token_batch(3, T)
    with torch.no_grad():
        logits = model(ids, None, None)  # GPTModel's own forward: [B, T, V]
        decoded = _decode(model, ids, model.empty_cache(3))
    torch.testing.assert_close(decoded, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_decoding_token_by_token_equals_full_forward(name):
    spawn(_decode_from_scratch_equals_forward, 1, name)


def _branch_states_continue_like_the_prefix(name):
    initialize(seed=2, device="cpu")
    model = tiny_fast_weight_model(name)
    ids = token_batch(2, T, seed=5)
    positions = torch.tensor([[3, 15, 16, 30], [0, 11, 12, 31]])
    k = 5
    with pytest.raises(TypeError, match=r"choose them after the forward .*states_after\(positions\)"):
        model.forward_with_branch_states(ids, positions)  # positions come after the forward now
    with torch.no_grad():
        out = model.forward_with_branch_states(ids)
        torch.testing.assert_close(out.logits, model(ids, None, None))
        assert out.hidden.shape == (2, T, model.config.hidden_size)
        # Continue every branch with the true next k tokens: the full forward's logits at those positions.
        rows = [(b, p) for b in range(2) for p in positions[b].tolist()]
        continuation = torch.stack([ids[b, p + 1 : p + 1 + k] for b, p in rows])  # [B*P, k]
        decoded = _decode(model, continuation, out.states_after(positions))
        expected = torch.stack([out.logits[b, p + 1 : p + 1 + k] for b, p in rows])
        torch.testing.assert_close(decoded, expected, atol=2e-5, rtol=1e-4)
        # And equal to decoding after feeding tokens[:p+1] from an empty cache.
        b, p = rows[2]
        cache = model.empty_cache(1)
        _decode(model, ids[b : b + 1, : p + 1], cache)
        torch.testing.assert_close(_decode(model, continuation[2:3], cache)[0], decoded[2], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_decoding_from_branch_states_equals_decoding_after_the_prefix(name):
    spawn(_branch_states_continue_like_the_prefix, 1, name)


def _branch_gradients_equal_prefix_rerun(name):
    # float64: LaCT's Newton-Schulz amplifies fp32 rounding, and some exact gradients are zero (the first
    # chunk's momentum multiplies a zero previous update), which fp32 shows as noise on both paths.
    initialize(seed=3, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64)
    ids = token_batch(1, T, seed=7)
    p, k = 17, 4
    rollout = token_batch(1, k, seed=8)
    weights = torch.randn(1, k, model.vocab_size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    params = [q for q in model.parameters()]

    # Branch: one forward over the whole document, then k cached steps from the state after p.
    cache = model.forward_with_branch_states(ids).states_after(torch.tensor([[p]]))
    logits = _decode(model, rollout, cache)  # predictions after each rollout token
    branch_grads = torch.autograd.grad((logits * weights).sum(), params, allow_unused=True)

    # Explicit: re-run the prefix with the rollout appended.
    rerun = model(torch.cat([ids[:, : p + 1], rollout], dim=1), None, None)[:, p + 1 :]
    torch.testing.assert_close(logits, rerun, atol=2e-5, rtol=1e-4)
    rerun_grads = torch.autograd.grad((rerun * weights).sum(), params, allow_unused=True)
    assert_gradients_close(model, branch_grads, rerun_grads)
    # The loss reaches the prefix's memory writes (fast-weight states, attention's keys and values): the mixers'
    # input projections of every layer get gradient.
    names = [n for n, _ in model.named_parameters()]
    projections = [g for n, g in zip(names, branch_grads) if n.endswith(("in_proj.weight", "linear_qkv.weight"))]
    assert len(projections) == model.config.num_layers and all(g.abs().max() > 0 for g in projections)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_gradients_through_branch_equal_an_explicit_prefix_rerun(name):
    spawn(_branch_gradients_equal_prefix_rerun, 1, name)


def _generation(name):
    initialize(seed=4, device="cpu")
    model = tiny_fast_weight_model(name)
    prompts = token_batch(3, 9, seed=1)
    greedy = generate(model, prompts, 6, greedy=True)
    # Greedy generation is the argmax continuation of the full forward, token by token.
    seq = prompts
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq, None, None)[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, seq[:, 9:])
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompts, 6, temperature=1.0, top_p=0.9, generator=g)
    assert sampled.shape == (3, 6) and sampled.min() >= 0 and sampled.max() < VOCAB


@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_generation_matches_the_full_forward(name):
    spawn(_generation, 1, name)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_tokens(logits, top_p=0.75, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    assert sample_tokens(logits, greedy=True).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(logits, top_p=0.0)
