"""GRPO: group-normalised advantages and the dual-clip PPO surrogate, plus the k3 KL estimator."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6, mask: torch.Tensor | None = None) -> torch.Tensor:
    """rewards [G, S] (G groups of S rollouts) -> (r - mean_group) / (std_group + eps).

    std is the unbiased one (as in verl); a group of one rollout keeps its reward (mean 0, std 1), and a group
    whose rewards are all equal gets zero advantages. mask [G, S]: rollouts that count; the others get 0.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    m = mask.to(rewards.dtype)
    count = m.sum(dim=1, keepdim=True)
    mean = (rewards * m).sum(dim=1, keepdim=True) / count.clamp(min=1)
    std = (((rewards - mean) * m).square().sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    advantages = torch.where(count > 1, (rewards - mean) / (std + eps), rewards)
    return advantages * m


def ppo_clipped_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dual-clip PPO loss and a per-token "clipped" flag (same shapes as the inputs).

    loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), and for A < 0 at most -A * dual_clip. The log-ratio
    is clamped to [-20, 20] before exp, as in the release (verl): a far off-policy token gives a finite ratio
    and no gradient, never inf or NaN.
    """
    ratio = torch.exp(torch.clamp(log_probs - old_log_probs, -20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, (clipped > unclipped).float()


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_log_probs - log_probs
    return torch.exp(delta) - delta - 1
