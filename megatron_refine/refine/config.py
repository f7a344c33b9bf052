"""REFINE settings; defaults from the paper's released scripts (../shared/specs/refine-algorithm.md)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_refine.refine.rewards import REWARDS
from megatron_refine.refine.selection import MODES


@dataclass
class RefineConfig:
    n_chunks: int = 8  # selected positions per document, one per chunk
    k: int = 5  # rollout length (tokens)
    n: int = 1  # rollouts per position
    temperature: float = 1.0
    top_p: float = 1.0
    selection: str = "entropy"  # entropy, uniform, argmax, argmin
    margin: int = 20  # rollouts start at least this far from both ends
    reward: str = "cosine"  # cosine (mid-training), hybrid (post-training), binary (test-time training)
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 3.0
    sft_coef: float = 1.0  # loss = sft_coef * NTP + ppo_coef * PG (+ kl_coef * KL)
    ppo_coef: float = 0.2
    kl_coef: float = 0.0  # k3 KL to a frozen copy of the starting model; off as in the release
    every: int = 1  # in refine-mid, every `every`-th step is a REFINE step (1: all, as released), the others NTP
    # PPO mini-batches: one rollout round (select, branch, sample, score, old log-probs) over this many steps'
    # batches, then one optimizer step on each, recomputing the current policy's log-probs of the stored rollouts
    # (so clipping acts from the second step on, as in the release: 128 documents, 4 steps of 32). 1: on-policy.
    mini_batches: int = 1
    # Warn when the decoder's log-prob of a rollout token and the training forward's differ by more than this
    # (max |difference| in nats over the step's rollout tokens): the two paths have drifted apart.
    logprob_parity_tolerance: float = 0.05
    # Ablation (the release's first version scored rollouts with the prefix under no_grad): true stops the policy
    # gradient at the branch states. The rollouts are scored from detached states, so the PG trains how the model
    # reads its memory and continues, not how the prefix writes it; the first rollout token, predicted by the
    # prefix's own forward, then carries no PG gradient. The NTP loss is unchanged. Default false: the PG
    # flows through the prefix's fast-weight writes, which is the point of the method.
    detach_prefix: bool = False
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the key and the fix; `load_config` calls it before any rank starts."""
        for key in ("n_chunks", "k", "n", "every", "mini_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"refine.{key} must be >= 1, got {getattr(self, key)}")
        if self.margin < self.k:
            raise ValueError(f"refine.margin ({self.margin}) must be >= refine.k ({self.k}): a rollout of k tokens is "
                             "compared with the k tokens after it, which must lie in the document; raise "
                             "refine.margin or lower refine.k")
        if self.mini_batches > 1 and self.every != 1:
            raise ValueError(f"refine.mini_batches={self.mini_batches} runs a rollout round over that many consecutive "
                             f"REFINE steps: set refine.every=1 (got {self.every}) or refine.mini_batches=1")
        if not isinstance(self.detach_prefix, bool):
            raise ValueError(f"refine.detach_prefix must be true or false, got {self.detach_prefix!r}")
        if self.selection not in MODES:
            raise ValueError(f"refine.selection must be one of {MODES}, got {self.selection!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"refine.reward must be one of {REWARDS}, got {self.reward!r}")
