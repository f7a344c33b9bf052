"""Self-supervised rewards of k-token rollouts against the true continuation (one scalar per rollout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REWARDS = ("cosine", "binary", "hybrid")


def rollout_rewards(
    kind: str,
    rollout_tokens: torch.Tensor,  # [R, k]
    truth_tokens: torch.Tensor,  # [R, k]
    rollout_hidden: torch.Tensor | None = None,  # [R, k, h], last layer after the final norm
    truth_hidden: torch.Tensor | None = None,  # [R, k, h], same, from the full-sequence forward
) -> torch.Tensor:
    """cosine: mean_j cos(h_rollout_j, h_truth_j); binary: mean_j [rollout_j == truth_j]; hybrid: mean_j of
    their sum (range [-1, 2]). -> [R]"""
    if kind not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {kind!r}")
    match = (rollout_tokens == truth_tokens).float()
    if kind == "binary":
        return match.mean(-1)
    cosine = F.cosine_similarity(rollout_hidden.float(), truth_hidden.float(), dim=-1)
    return cosine.mean(-1) if kind == "cosine" else (cosine + match).mean(-1)
