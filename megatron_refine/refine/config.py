"""REFINE settings; defaults from the paper's released scripts (../shared/specs/refine-algorithm.md)."""

from __future__ import annotations

from dataclasses import dataclass


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
    every: int = 2  # in refine-mid, every `every`-th step is a REFINE step, the others plain NTP
    # Warn when the decoder's log-prob of a rollout token and the training forward's differ by more than this
    # (max |difference| in nats over the step's rollout tokens): the two paths have drifted apart.
    logprob_parity_tolerance: float = 0.05
    seed: int = 0
