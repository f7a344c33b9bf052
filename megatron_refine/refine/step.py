"""One REFINE forward on a batch of documents: select, roll out from branch states, score, GRPO loss.

The gradient path is the point of the method: the rollout tokens' log-probs are computed from the decoding
states that ONE forward over the documents leaves after each selected position (kept in the graph), so the
policy loss backpropagates through the prefix's fast-weight writes. The same forward's logits give the NTP
loss and the first rollout token; k cached decode steps give the rest. No prefix is ever re-encoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_refine.models.generation import same_on_tp_ranks, sample_tokens
from megatron_refine.refine.config import RefineConfig
from megatron_refine.refine.grpo import grpo_advantages, k3_kl, ppo_clipped_loss
from megatron_refine.refine.rewards import rollout_rewards
from megatron_refine.refine.selection import select_positions
from megatron_refine.refine.vocab import vocab_parallel_entropy, vocab_parallel_log_probs


@dataclass
class Rollouts:
    positions: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [R, k], R = B * P * n, rows ordered (b, p, sample)
    log_probs: torch.Tensor  # [R, k], differentiable through the branch states
    hidden: torch.Tensor  # [R, k, h], after each rollout token (last layer, final norm), detached


def select(model, tokens: torch.Tensor, cfg: RefineConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad forward -> next-token entropy [B, T] -> positions [B, n_chunks] and their entropies."""
    with torch.no_grad():
        entropy = vocab_parallel_entropy(model(tokens, None, None))  # logits [B, T, V/t]
    positions = select_positions(entropy, n_chunks=cfg.n_chunks, k=cfg.k, margin=cfg.margin, mode=cfg.selection,
                                 generator=generator)
    return positions, entropy.gather(1, positions)


def branch_starts(out, positions: torch.Tensor, n: int):
    """Where every rollout starts: the logits at each position (predicting its first token) and the decoding
    state after it, each repeated for the n rollouts of a position -> (logits [R, V/t], cache of R rows)."""
    b = torch.arange(positions.shape[0], device=positions.device)[:, None]
    logits = out.logits[b, positions].flatten(0, 1).repeat_interleave(n, dim=0)
    return logits, (out.cache.repeat_interleave(n) if n > 1 else out.cache)


def roll_out(model, out, positions: torch.Tensor, cfg: RefineConfig, generator: torch.Generator) -> Rollouts:
    """k tokens from every branch state (n samples each), with differentiable log-probs."""
    logits, cache = branch_starts(out, positions, cfg.n)
    tokens, log_probs, hidden = [], [], []
    for _ in range(cfg.k):
        full = gather_from_tensor_model_parallel_region(logits.detach())
        token = same_on_tp_ranks(sample_tokens(full, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator))
        tokens.append(token)
        log_probs.append(vocab_parallel_log_probs(logits, token))
        logits, h = model.step(token, cache)
        hidden.append(h.detach())
    return Rollouts(positions, torch.stack(tokens, 1), torch.stack(log_probs, 1), torch.stack(hidden, 1))


def reference_log_probs(ref_model, tokens: torch.Tensor, rollouts: Rollouts, n: int) -> torch.Tensor:
    """The frozen reference's log-probs of the same rollout tokens, by the same branched procedure."""
    with torch.no_grad():
        out = ref_model.forward_with_branch_states(tokens, rollouts.positions)
        logits, cache = branch_starts(out, rollouts.positions, n)
        result = []
        for j in range(rollouts.tokens.shape[1]):
            result.append(vocab_parallel_log_probs(logits, rollouts.tokens[:, j]))
            logits, _ = ref_model.step(rollouts.tokens[:, j], cache)
        return torch.stack(result, 1)


def refine_loss(model, tokens: torch.Tensor, labels: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
                ref_model=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The REFINE objective on documents tokens [B, T] (labels = next tokens): sft * NTP + ppo * PG (+ kl * KL)."""
    t0 = time.perf_counter()
    positions, selected_entropy = select(model, tokens, cfg, generator)
    t1 = time.perf_counter()
    out = model.forward_with_branch_states(tokens, positions)
    ntp = -vocab_parallel_log_probs(out.logits, labels).mean()
    rollouts = roll_out(model, out, positions, cfg, generator)
    t2 = time.perf_counter()

    B, P = positions.shape
    R, k = rollouts.tokens.shape
    b = torch.arange(B, device=tokens.device)[:, None, None]
    steps = positions[..., None] + torch.arange(k, device=tokens.device)  # [B, P, k]
    truth = labels[b, steps].flatten(0, 1).repeat_interleave(cfg.n, dim=0)  # x_{p+1..p+k}
    truth_hidden = out.hidden.detach()[b, steps + 1].flatten(0, 1).repeat_interleave(cfg.n, dim=0)  # after x_{p+j}
    rewards = rollout_rewards(cfg.reward, rollouts.tokens, truth, rollouts.hidden, truth_hidden)  # [R]
    # Groups: the n_chunks rollouts of one document (n = 1), or the n rollouts of one position.
    groups = rewards.view(B, P) if cfg.n == 1 else rewards.view(B * P, cfg.n)
    advantages = grpo_advantages(groups).reshape(R, 1).expand(R, k)
    per_token, clipped = ppo_clipped_loss(rollouts.log_probs, rollouts.log_probs.detach(), advantages,
                                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)
    # Token mean over every DP rank's rollout tokens (DDP then averages gradients over DP).
    dp_group = parallel_state.get_data_parallel_group()
    total = torch.tensor(float(R * k), device=tokens.device)
    torch.distributed.all_reduce(total, group=dp_group)
    scale = parallel_state.get_data_parallel_world_size() / total
    pg = per_token.sum() * scale
    loss = cfg.sft_coef * ntp + cfg.ppo_coef * pg
    kl = torch.zeros((), device=tokens.device)
    if ref_model is not None:
        kl = k3_kl(rollouts.log_probs, reference_log_probs(ref_model, tokens, rollouts, cfg.n)).sum() * scale
        loss = loss + cfg.kl_coef * kl
    metrics = {
        "ntp_loss": ntp.detach(), "pg_loss": pg.detach(), "kl": kl.detach(),
        "reward_mean": rewards.mean(), "reward_std": rewards.std() if R > 1 else torch.zeros(()),
        "selected_entropy": selected_entropy.mean(), "clip_fraction": clipped.mean(),
        "rollout_tokens": torch.tensor(float(R * k)), "time_select": torch.tensor(t1 - t0),
        "time_rollout": torch.tensor(t2 - t1),
    }
    return loss, {name: v.detach().float().to(tokens.device) for name, v in metrics.items()}
