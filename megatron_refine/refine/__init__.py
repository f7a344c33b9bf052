"""REFINE: entropy-selected positions, rollouts branched from fast-weight states, self-supervised rewards, GRPO."""

from megatron_refine.refine.config import RefineConfig
from megatron_refine.refine.grpo import grpo_advantages, k3_kl, ppo_clipped_loss
from megatron_refine.refine.rewards import REWARDS, rollout_rewards
from megatron_refine.refine.selection import (
    MODES,
    chunks_with_candidates,
    eligible_positions,
    min_sequence_length,
    select_positions,
    smooth_entropy,
)
from megatron_refine.refine.step import (
    STEP_PHASES,
    Rollouts,
    StoredRollouts,
    branch_starts,
    check_logprob_parity,
    logprob_parity,
    policy_loss,
    ppo_update_loss,
    refine_loss,
    roll_out,
    rollout_round,
    select,
)

__all__ = [
    "MODES",
    "STEP_PHASES",
    "REWARDS",
    "RefineConfig",
    "Rollouts",
    "StoredRollouts",
    "branch_starts",
    "check_logprob_parity",
    "chunks_with_candidates",
    "eligible_positions",
    "grpo_advantages",
    "k3_kl",
    "logprob_parity",
    "min_sequence_length",
    "policy_loss",
    "ppo_clipped_loss",
    "ppo_update_loss",
    "refine_loss",
    "roll_out",
    "rollout_round",
    "rollout_rewards",
    "select",
    "select_positions",
    "smooth_entropy",
]
