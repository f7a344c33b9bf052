"""Sampling and loss rules of the authors' release: rollouts never sample EOS or a padding id, the PPO log-ratio
is clamped, the entropy smoothing counts the zero padding at the edges; and the refine.detach_prefix ablation."""

import pytest
import torch
import torch.nn.functional as F
from megatron_modules import VOCAB, assert_gradients_close, tiny_fast_weight_model, token_batch

from megatron_refine.refine import RefineConfig, branch_starts, ppo_clipped_loss, refine_loss, roll_out, smooth_entropy
from megatron_refine.models.losses import vocab_parallel_log_probs
from megatron_refine.runtime import initialize, spawn

T = 64
EOS = VOCAB - 1


def _boost_eos_and_padding(model):
    """The output layer's logits +100 on EOS and on every padding id (before the model masks the padding)."""
    from megatron.core import parallel_state

    raw = model.output_layer.forward

    def boosted(*args, **kwargs):
        logits, bias = raw(*args, **kwargs)
        start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        ids = torch.arange(start, start + logits.shape[-1])
        return logits + 100.0 * ((ids == EOS) | (ids >= VOCAB)), bias

    model.output_layer.forward = boosted  # the forward hooks (the padding mask) still run around it


def _rollout_tokens(tp):
    initialize(tp=tp, seed=3, device="cpu")
    model = tiny_fast_weight_model("deltanet_tiny")
    _boost_eos_and_padding(model)
    ids = token_batch(2, T, seed=1)
    positions = torch.tensor([[10, 30, 50], [20, 25, 40]])
    out = model.forward_with_branch_states(ids)
    drawn = {}
    for temperature in (1.0, 0.0):  # sampled, and greedy (the trainer's REFINE tests)
        cfg = RefineConfig(k=4, n=2, temperature=temperature)
        for eos_id in (EOS, None):
            rollouts = roll_out(model, out, positions, cfg, torch.Generator().manual_seed(0), eos_id=eos_id)
            drawn[temperature, eos_id] = rollouts.tokens
    return drawn


@pytest.mark.parametrize("tp", [1, 2])
def test_rollouts_never_sample_eos_or_a_padding_id(tp):
    for drawn in spawn(_rollout_tokens, tp, tp):
        for temperature in (1.0, 0.0):
            banned = drawn[temperature, EOS]
            assert banned.numel() == 2 * 3 * 2 * 4 and (banned != EOS).all() and (banned < VOCAB).all()
            # Without the ban EOS wins everywhere, though the padding ids were boosted as much: they are masked.
            assert (drawn[temperature, None] == EOS).all()


def test_ppo_log_ratio_is_clamped_to_20_nats():
    """verl's clamp: exp(clamp(logp - old, -20, 20)); beyond it the ratio is e^±20 and the gradient is 0, where
    exp(1000) would make the loss inf and the gradient NaN."""
    old = torch.zeros(4)
    logp = torch.tensor([1000.0, -1000.0, 1000.0, 19.0], requires_grad=True)
    adv = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    loss, _ = ppo_clipped_loss(logp, old, adv, eps_low=0.2, eps_high=0.2, dual_clip=1e12)
    r = torch.tensor([20.0, -20.0, 20.0, 19.0]).exp()
    expected = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
    torch.testing.assert_close(loss.detach(), expected)
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[:3] == 0).all()
    assert torch.isclose(logp.grad[3], torch.tensor(19.0).exp())  # inside the clamp: -A * r


@pytest.mark.parametrize("k", [3, 4, 5])
def test_entropy_smoothing_counts_the_zero_padding_at_the_edges(k):
    entropy = torch.rand(2, 30, generator=torch.Generator().manual_seed(k)) * 4
    window = k + 1 if k % 2 == 0 else k
    expected = F.avg_pool1d(entropy[:, None], window, stride=1, padding=window // 2, count_include_pad=True)[:, 0]
    torch.testing.assert_close(smooth_entropy(entropy, k), expected)
    edge = smooth_entropy(torch.tensor([[3.0, 0, 0, 0, 0, 0]]), 3)[0, 0]
    assert torch.isclose(edge, torch.tensor(1.0))  # (0 + 3 + 0) / 3: the padding counts, as in the release


def _detached_prefix_gradients():
    initialize(seed=4, device="cpu")
    model = tiny_fast_weight_model("lact_tiny", params_dtype=torch.float64)
    params = list(model.parameters())
    ids = token_batch(2, T, seed=3)
    positions = torch.tensor([[7, 30, 41], [12, 19, 50]])

    def pg_grads(detach_prefix):
        cfg = RefineConfig(k=4, n=2, detach_prefix=detach_prefix)
        out = model.forward_with_branch_states(ids)
        rollouts = roll_out(model, out, positions, cfg, torch.Generator().manual_seed(0))
        weights = torch.randn(rollouts.log_probs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad((rollouts.log_probs * weights).sum(), params, allow_unused=True)
        return rollouts, weights, grads

    rollouts, weights, detached = pg_grads(True)
    # Explicitly: the prefix forward without a graph, the rollouts scored from its branch states.
    with torch.no_grad():
        first_logits, cache = branch_starts(model.forward_with_branch_states(ids), positions, 2)
    logits, _ = model.forward_from_cache(rollouts.tokens, cache)
    log_probs = torch.cat([vocab_parallel_log_probs(first_logits, rollouts.tokens[:, 0])[:, None],
                           vocab_parallel_log_probs(logits[:, :-1], rollouts.tokens[:, 1:])], dim=1)
    torch.testing.assert_close(rollouts.log_probs, log_probs, atol=1e-10, rtol=1e-8)
    reference = torch.autograd.grad((log_probs * weights).sum(), params, allow_unused=True)
    assert_gradients_close(model, detached, reference)

    through, _, full = pg_grads(False)  # the default: the same tokens, the gradient also through the prefix
    assert torch.equal(through.tokens, rollouts.tokens)
    difference = sum((a - b).norm() ** 2 for a, b in zip(full, detached) if a is not None and b is not None) ** 0.5
    assert difference > 1e-3 * sum(a.norm() ** 2 for a in full if a is not None) ** 0.5

    # The whole REFINE loss: the same value either way (only the gradient path changes).
    cfg = dict(n_chunks=2, margin=6, k=3)
    losses = [refine_loss(model, ids[:, :-1], ids[:, 1:], RefineConfig(**cfg, detach_prefix=d),
                          torch.Generator().manual_seed(2))[0].item() for d in (True, False)]
    assert losses[0] == losses[1]


def test_detach_prefix_scores_rollouts_from_detached_branch_states():
    spawn(_detached_prefix_gradients, 1)


def test_detach_prefix_is_checked():
    from megatron_refine.training import load_config

    assert load_config("tiny-deltanet", ["refine.detach_prefix=true"]).refine.detach_prefix is True
    with pytest.raises(ValueError, match="refine.detach_prefix"):
        load_config("tiny-deltanet", ["refine.detach_prefix=maybe"])
    with pytest.raises(ValueError, match="refine.detach_prefix must be true or false"):
        RefineConfig(detach_prefix="false").validate()


def _positions_on_padded_rows():
    from megatron_refine.refine.step import select

    initialize(seed=0, device="cpu")
    model = tiny_fast_weight_model("deltanet_tiny")
    ids = token_batch(2, T, seed=2)
    lengths = torch.tensor([30, T])  # row 0: a 31-token document (30 labels), then padding labels; row 1: no padding
    cfg = RefineConfig(n_chunks=4, k=3, margin=5, selection="uniform")
    kept, unrestricted = [], []
    with torch.no_grad():
        logits = model(ids, None, None)
    for seed in range(20):
        positions, _, valid = select(logits, cfg, torch.Generator().manual_seed(seed), lengths=lengths)
        kept.append(positions[0][valid[0]])
        assert valid[1].all()
        unrestricted.append(select(logits, cfg, torch.Generator().manual_seed(seed))[0][0])
    return torch.cat(kept), torch.cat(unrestricted)


def test_rollouts_on_padded_rows_start_and_end_in_the_document():
    kept, unrestricted = spawn(_positions_on_padded_rows, 1)[0]
    # a rollout from t reads labels t .. t + k - 1 (and the margin's): all before the padding at label 30
    assert len(kept) > 0 and (kept + 5 < 30).all() and (kept >= 5).all()
    assert (unrestricted + 5 >= 30).any()  # without the padding mask, draws land there
