"""Selection, rewards, advantages and the PPO loss against straightforward formulas on hand-made tensors."""

import math

import pytest
import torch

from megatron_refine.refine import (
    grpo_advantages,
    k3_kl,
    ppo_clipped_loss,
    rollout_rewards,
    select_positions,
    smooth_entropy,
)


def test_smoothing_is_a_centred_moving_average():
    e = torch.tensor([[0.0, 0, 5, 0, 0, 0, 0]])
    s = smooth_entropy(e, k=3)
    assert torch.allclose(s[0, 1:4], torch.tensor([5 / 3, 5 / 3, 5 / 3])) and s[0, 5] == 0
    assert torch.allclose(smooth_entropy(e, k=4), smooth_entropy(e, k=5))  # even k uses k + 1
    # The zero padding at the edges counts in the mean (the release's count_include_pad=True): (0 + 3 + 0) / 3.
    assert s[0, 0] == 0 and torch.isclose(smooth_entropy(torch.tensor([[3.0, 0, 0, 0]]), 3)[0, 0], torch.tensor(1.0))


@pytest.mark.parametrize("mode", ["entropy", "uniform", "argmax", "argmin"])
def test_one_position_per_chunk_inside_the_margins(mode):
    T, margin, n = 100, 20, 6
    entropy = torch.rand(3, T, generator=torch.Generator().manual_seed(0))
    pos = select_positions(entropy, n_chunks=n, margin=margin, mode=mode, generator=torch.Generator().manual_seed(1))
    size = (T - 2 * margin) // n
    assert pos.shape == (3, n) and (pos >= margin).all() and (pos < T - margin).all()
    for c in range(n):
        hi = T - margin if c == n - 1 else margin + (c + 1) * size
        assert ((pos[:, c] >= margin + c * size) & (pos[:, c] < hi)).all()


def test_argmax_picks_the_maximum_and_selection_is_reproducible():
    entropy = torch.zeros(1, 60)
    entropy[0, 33] = 10.0
    pos = select_positions(entropy, n_chunks=2, k=1, margin=10, mode="argmax")
    assert pos[0, 1] == 33
    e = torch.rand(2, 80)
    a = select_positions(e, n_chunks=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, select_positions(e, n_chunks=4, generator=torch.Generator().manual_seed(5)))


def test_too_short_a_sequence_says_what_to_change():
    with pytest.raises(ValueError, match=r"sequence length 40 leaves 0 candidate positions .* use longer sequences \(>= 48\)"):
        select_positions(torch.rand(1, 40), n_chunks=8, margin=20)
    with pytest.raises(ValueError, match="margin"):
        select_positions(torch.rand(1, 40), margin=2, k=5)


def test_rewards_match_their_definitions():
    rollout = torch.tensor([[1, 2, 3], [4, 5, 6]])
    truth = torch.tensor([[1, 9, 3], [0, 0, 0]])
    h_r = torch.tensor([[[1.0, 0], [0, 1], [1, 1]], [[1, 0], [1, 0], [1, 0]]])
    h_t = torch.tensor([[[1.0, 0], [1, 0], [1, 1]], [[-1, 0], [-1, 0], [1, 0]]])
    binary = rollout_rewards("binary", rollout, truth)
    cosine = rollout_rewards("cosine", rollout, truth, h_r, h_t)
    hybrid = rollout_rewards("hybrid", rollout, truth, h_r, h_t)
    assert torch.allclose(binary, torch.tensor([2 / 3, 0.0]))
    assert torch.allclose(cosine, torch.tensor([(1 + 0 + 1) / 3, (-1 - 1 + 1) / 3]))
    assert torch.allclose(hybrid, cosine + binary)


def test_grpo_advantages_including_zero_variance_and_singleton_groups():
    r = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = grpo_advantages(r)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1.0 + 1e-6))  # unbiased std of 1,2,3 is 1
    assert torch.equal(adv[1], torch.zeros(3))
    assert torch.equal(grpo_advantages(torch.tensor([[0.7], [0.2]])), torch.tensor([[0.7], [0.2]]))


def test_ppo_loss_clips_and_dual_clips():
    logp_old = torch.zeros(6)
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 10.0])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    loss, clipped = ppo_clipped_loss(ratio.log(), logp_old, adv, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    expected = [-1.0, -1.2, -0.5, 1.5, 0.8, 3.0]  # max(-A r, -A clip(r)); A < 0 capped at -A * 3
    assert torch.allclose(loss, torch.tensor(expected))
    assert clipped.tolist() == [0, 1, 0, 0, 1, 0]  # where the clipped term is the larger (verl's clipfrac)
    # On policy (ratio 1) the gradient is -A * d log p.
    logp = torch.zeros(3, requires_grad=True)
    a = torch.tensor([2.0, -1.0, 0.5])
    ppo_clipped_loss(logp, logp.detach(), a)[0].sum().backward()
    assert torch.allclose(logp.grad, -a)


def test_k3_kl_is_nonnegative_and_zero_on_equal_policies():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    ref = torch.log(torch.tensor([0.3, 0.5, 0.1]))
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all() and kl[1] == 0
    assert math.isclose(kl[0].item(), 0.3 / 0.2 - math.log(0.3 / 0.2) - 1, rel_tol=1e-6)
