"""One REFINE forward on a batch of documents: select, roll out from branch states, score, GRPO loss.

The gradient path is the point of the method: the rollout tokens' log-probs are computed from the decoding
states that ONE forward over the documents leaves after each selected position (kept in the graph), so the
policy loss backpropagates through the prefix's fast-weight writes. The same forward's logits give the NTP
loss, the entropies that choose the positions (so no separate selection pass runs: the states after the
chosen positions are read afterwards from the forward's chunk states) and the first rollout token. The
decoder samples the other k - 1 tokens without a graph; the training forward then scores all k from the
branch states (`forward_from_cache`, the chunked kernels), and the two paths' log-probs are compared every
step (`logprob_diff_*`): a drift between them would bias GRPO silently.
No prefix is ever re-encoded. With packed documents every rollout starts and ends inside one document.
All softmaxes are over the tokenizer's vocabulary (the model masks Megatron's padding), and as in the release
a rollout never samples EOS (min_new_tokens = k); its log-probs are still the model's, EOS included.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_refine.models.generation import same_on_tp_ranks, sample_tokens, sampling_logits
from megatron_refine.models.losses import ntp_loss, vocab_parallel_entropy, vocab_parallel_log_probs
from megatron_refine.models.model import BranchOutput
from megatron_refine.models.packing import Packing
from megatron_refine.refine.config import RefineConfig
from megatron_refine.refine.grpo import grpo_advantages, k3_kl, ppo_clipped_loss
from megatron_refine.refine.rewards import rollout_rewards
from megatron_refine.refine.selection import chunks_with_candidates, eligible_positions, select_positions


@dataclass
class Rollouts:
    positions: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [R, k], R = B * P * n, rows ordered (b, p, sample)
    log_probs: torch.Tensor  # [R, k], the training forward's, differentiable through the branch states
    sampler_log_probs: torch.Tensor  # [R, k], the decoder's, as it sampled them (no graph)
    hidden: torch.Tensor  # [R, k, h], after each rollout token (last layer, final norm), detached
    seconds: dict[str, float]  # host time: "branch" (reading the states), "decode", "score"


def select(logits: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
           packed_seq_params: PackedSeqParams | None = None, lengths: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's logits [B, T, V/t] (detached) -> next-token entropy [B, T] -> positions [B, n_chunks], their
    entropies, and which of them are valid [B, n_chunks] (with packed documents or short rows a chunk may hold no
    position whose rollout fits). lengths [B]: each row's real labels (a padded document, a post-training prompt;
    the rest is padding or an answer): the chunks split that part only, and every rollout and its truth (and
    `margin` tokens more) stay in it."""
    with torch.no_grad():
        entropy = vocab_parallel_entropy(logits.detach())  # [B, T]
    eligible = None
    packing = Packing.from_params(packed_seq_params, *entropy.shape)
    if packing is not None:
        eligible = eligible_positions(packing.position_ids, packing.sequence_ids, cfg.margin)
    positions = select_positions(entropy, n_chunks=cfg.n_chunks, k=cfg.k, margin=cfg.margin, mode=cfg.selection,
                                 generator=generator, eligible=eligible, lengths=lengths)
    valid = torch.ones_like(positions, dtype=torch.bool) if eligible is None else eligible.gather(1, positions)
    if lengths is not None:
        valid = valid & chunks_with_candidates(lengths, cfg.n_chunks, cfg.margin)
    return positions, entropy.gather(1, positions), valid


def branch_starts(out: BranchOutput, positions: torch.Tensor, n: int):
    """Where every rollout starts: the logits at each position (predicting its first token) and the decoding
    state after it, each repeated for the n rollouts of a position -> (logits [R, V/t], cache of R rows)."""
    b = torch.arange(positions.shape[0], device=positions.device)[:, None]
    logits = out.logits[b, positions].flatten(0, 1).repeat_interleave(n, dim=0)
    cache = out.states_after(positions)
    return logits, (cache.repeat_interleave(n) if n > 1 else cache)


def roll_out(model, out: BranchOutput, positions: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
             eos_id: int | None = None) -> Rollouts:
    """k tokens from every branch state (n samples each): sampled by the decoder, scored by the training forward.
    eos_id: never sampled (every rollout has k tokens, as the release's min_new_tokens = k); None bans nothing.
    Rollouts.seconds: host time of reading the branch states, of the decoding and of the scoring forward."""
    t0 = time.perf_counter()
    first_logits, cache = branch_starts(out, positions, cfg.n)  # in the graph
    if cfg.detach_prefix:  # the ablation: no policy gradient into the prefix's forward and fast-weight writes
        first_logits, cache = first_logits.detach(), cache.detach()
    t1 = time.perf_counter()
    tokens, sampler_log_probs = [], []
    with torch.no_grad():
        logits, decoding = first_logits.detach(), cache.detach()
        for j in range(cfg.k):
            full = sampling_logits(logits, model.tokenizer_vocab_size, banned=eos_id)
            token = same_on_tp_ranks(sample_tokens(full, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator))
            tokens.append(token)
            sampler_log_probs.append(vocab_parallel_log_probs(logits, token))
            if j < cfg.k - 1:
                logits, _ = model.step(token, decoding)
    tokens = torch.stack(tokens, 1)  # [R, k]
    t2 = time.perf_counter()
    log_probs, hidden = rollout_log_probs(model, first_logits, cache, tokens)
    seconds = {"branch": t1 - t0, "decode": t2 - t1, "score": time.perf_counter() - t2}
    return Rollouts(positions, tokens, log_probs, torch.stack(sampler_log_probs, 1), hidden.detach(), seconds)


def rollout_log_probs(model, first_logits: torch.Tensor, cache, tokens: torch.Tensor):
    """The training forward's log-probs [R, k] of rollout tokens [R, k] from their branch starts (the logits
    predicting the first token, the states after the prefix), differentiable through both, and the hidden
    states [R, k, h] after each token (`forward_from_cache`: the chunked kernels from the branch states)."""
    logits, hidden = model.forward_from_cache(tokens, cache)  # [R, k, V/t]: predictions after each rollout token
    log_probs = torch.cat([vocab_parallel_log_probs(first_logits, tokens[:, 0])[:, None],
                           vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:])], dim=1)
    return log_probs, hidden


def reference_log_probs(ref_model, tokens: torch.Tensor, positions: torch.Tensor, rollout_tokens: torch.Tensor,
                        n: int, packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
    """The frozen reference's log-probs of the same rollout tokens, by the same branched training forward."""
    with torch.no_grad():
        out = ref_model.forward_with_branch_states(tokens, packed_seq_params)
        return rollout_log_probs(ref_model, *branch_starts(out, positions, n), rollout_tokens)[0]


def logprob_parity(rollouts: Rollouts, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoder vs training forward on the same rollout tokens (mask [R]: the rollouts that count)."""
    diff = (rollouts.log_probs.detach() - rollouts.sampler_log_probs)[mask]  # [valid, k]
    if diff.numel() == 0:
        zero = torch.zeros((), device=mask.device)
        return {"logprob_diff_mean": zero, "logprob_diff_max": zero, "ratio_mean": zero + 1}
    return {"logprob_diff_mean": diff.abs().mean(), "logprob_diff_max": diff.abs().max(),
            "ratio_mean": diff.exp().mean()}


def check_logprob_parity(metrics: dict[str, float], tolerance: float, step: int) -> bool:
    """Warn when the decoder and the training forward disagree on rollout log-probs; True when in tolerance."""
    worst = metrics.get("logprob_diff_max")
    if worst is None or worst <= tolerance:
        return True
    warnings.warn(
        f"step {step}: rollout log-probs of the decoder and the training forward differ by up to {worst:.3g} "
        f"nats (mean {metrics['logprob_diff_mean']:.3g}, mean ratio {metrics['ratio_mean']:.4f}), more than "
        f"refine.logprob_parity_tolerance={tolerance}: GRPO's ratio is off-policy. Check the kernels' dtypes "
        "(decode step vs chunked path) or raise the tolerance if this precision is expected.",
        RuntimeWarning, stacklevel=2,
    )
    return False


def group_advantages(cfg: RefineConfig, positions: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                     truth_hidden_states: torch.Tensor, rollout_tokens: torch.Tensor, rollout_hidden: torch.Tensor):
    """Rewards [R] of the rollouts against the true continuations, which of them count [R] (`valid`, per
    position, repeated n times), and their GRPO advantages [R, k]. Groups: the n_chunks rollouts of one row
    (n = 1), or the n rollouts of one position; with packed documents a row's group spans its documents, like
    the positions of one long document do."""
    B, P = positions.shape
    R, k = rollout_tokens.shape
    b = torch.arange(B, device=labels.device)[:, None, None]
    steps = positions[..., None] + torch.arange(k, device=labels.device)  # [B, P, k]
    truth = labels[b, steps].flatten(0, 1).repeat_interleave(cfg.n, dim=0)  # x_{p+1..p+k}
    truth_hidden = truth_hidden_states[b, steps + 1].flatten(0, 1).repeat_interleave(cfg.n, dim=0)  # after x_{p+j}
    rewards = rollout_rewards(cfg.reward, rollout_tokens, truth, rollout_hidden, truth_hidden)  # [R]
    mask = valid.reshape(-1).repeat_interleave(cfg.n)  # [R]
    group_shape = (B, P * cfg.n) if cfg.n == 1 else (B * P, cfg.n)
    advantages = grpo_advantages(rewards.view(group_shape), mask=mask.view(group_shape)).reshape(R, 1).expand(R, k)
    return rewards, mask, advantages


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of per-token values over every DP rank's counted tokens, as this rank's share: DDP averages
    gradients over DP, so each rank's sum is scaled by DP size / the global count. per_token [R, k]; mask [R]
    (rollouts: all k tokens of a counted row) or per_token's shape (token weights)."""
    weights = mask.to(per_token.dtype)
    if weights.dim() < per_token.dim():
        weights = weights[:, None].expand_as(per_token)
    total = weights.sum().to(torch.float32).clone()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    scale = parallel_state.get_data_parallel_world_size() / total.clamp(min=1)
    return (per_token * weights).sum() * scale


def policy_loss(cfg: RefineConfig, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dual-clip PPO loss as a token mean over every DP rank's counted rollout tokens (DDP then averages
    gradients over DP), and its statistics against the old log-probs: clipped fraction, approximate (k3) KL
    between old and new policy, mean ratio. log_probs, old_log_probs, advantages [R, k]; mask [R]."""
    per_token, clipped = ppo_clipped_loss(log_probs, old_log_probs, advantages,
                                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)
    zero = torch.zeros((), device=log_probs.device)
    new = log_probs.detach()[mask]
    old = old_log_probs[mask]
    stats = {
        "clip_fraction": clipped[mask].mean() if mask.any() else zero,
        "approx_kl": k3_kl(new, old).mean() if mask.any() else zero,
        "ppo_ratio_mean": (new - old).exp().mean() if mask.any() else zero + 1,
        "rollout_tokens": (mask.sum() * log_probs.shape[1]).float(),
    }
    return token_mean(per_token, mask), stats


def refine_loss(model, tokens: torch.Tensor, labels: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
                ref_model=None, packed_seq_params: PackedSeqParams | None = None, loss_mask: torch.Tensor | None = None,
                eos_id: int | None = None, lengths: torch.Tensor | None = None, ntp_tokens: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The on-policy REFINE objective on documents tokens [B, T] (labels = next tokens): sft * NTP + ppo * PG
    (+ kl * KL), the rollouts sampled and scored by this very forward (refine.mini_batches = 1).

    packed_seq_params: document starts of packed rows (models/packing.py); rollouts then start and end
    inside one document and branch from that document's own state.
    loss_mask [B, T]: the NTP loss's per-token weights (e.g. Megatron's eod_mask_loss), a mean over them.
    eos_id: the tokenizer's EOS, which rollouts never sample (None: no id banned).
    lengths [B]: each row's real labels when the rest is padding or an answer (`select`): no rollout goes there.
    ntp_tokens: the NTP loss as a token mean over the whole step (`mean_loss`), not this micro-batch's mean.
    """
    t0 = time.perf_counter()
    out = model.forward_with_branch_states(tokens, packed_seq_params)
    ntp = ntp_loss(out.logits, labels, loss_mask, ntp_tokens)
    t1 = time.perf_counter()
    positions, selected_entropy, valid = select(out.logits, cfg, generator, packed_seq_params, lengths)
    t2 = time.perf_counter()
    rollouts = roll_out(model, out, positions, cfg, generator, eos_id)
    rewards, mask, advantages = group_advantages(cfg, positions, valid, labels, out.hidden.detach(),
                                                 rollouts.tokens, rollouts.hidden)
    pg, stats = policy_loss(cfg, rollouts.log_probs, rollouts.log_probs.detach(), advantages, mask)
    loss = cfg.sft_coef * ntp + cfg.ppo_coef * pg
    kl = torch.zeros((), device=tokens.device)
    if ref_model is not None:
        ref = reference_log_probs(ref_model, tokens, positions, rollouts.tokens, cfg.n, packed_seq_params)
        kl = token_mean(k3_kl(rollouts.log_probs, ref), mask)
        loss = loss + cfg.kl_coef * kl
    metrics = {"ntp_loss": ntp, "pg_loss": pg, "kl": kl, **stats,
               **_rollout_metrics(rewards, mask, selected_entropy, valid, rollouts, t1 - t0, t2 - t1)}
    return loss, {name: v.detach().float().to(tokens.device) for name, v in metrics.items()}


# The phases of a step (or a rollout round) timed on the host, as metrics `time_<phase>`: the forward over the
# documents (with the NTP loss), choosing the positions and reading the states after them, the k - 1 decode
# steps, the scoring forward over the rollout tokens (log-probs). Rewards and the loss follow in microseconds.
STEP_PHASES = ("forward", "select", "rollout", "score")


def _rollout_metrics(rewards, mask, selected_entropy, valid, rollouts: Rollouts, forward_s: float,
                     select_s: float) -> dict[str, torch.Tensor]:
    """Rewards, selection, log-prob parity, and the host time of each phase (`STEP_PHASES`)."""
    counted = rewards[mask]
    zero = torch.zeros((), device=rewards.device)
    seconds = {"forward": forward_s, "select": select_s + rollouts.seconds["branch"],
               "rollout": rollouts.seconds["decode"], "score": rollouts.seconds["score"]}
    return {
        "reward_mean": counted.mean() if counted.numel() else zero,
        "reward_std": counted.std() if counted.numel() > 1 else zero,
        "selected_entropy": selected_entropy[valid].mean() if valid.any() else zero,
        **{f"time_{phase}": torch.tensor(seconds[phase]) for phase in STEP_PHASES},
        **logprob_parity(rollouts, mask),
    }


@dataclass
class StoredRollouts:
    """One micro-batch's share of a rollout round (refine.mini_batches > 1), kept without a graph for its PPO
    update: where the rollouts branch, their tokens, the round's (old) log-probs and advantages."""

    positions: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [R, k]
    old_log_probs: torch.Tensor  # [R, k], the training forward's at the round's policy
    advantages: torch.Tensor  # [R, k]
    mask: torch.Tensor  # [R], the rollouts that count
    metrics: dict[str, torch.Tensor]  # rewards, selection and log-prob parity of the round


def rollout_round(model, tokens: torch.Tensor, labels: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
                  packed_seq_params: PackedSeqParams | None = None, eos_id: int | None = None,
                  lengths: torch.Tensor | None = None) -> StoredRollouts:
    """Select, branch, sample, score and take the old log-probs of one micro-batch, without a graph: the rollout
    half of a step, stored for the `mini_batches` PPO updates that follow (`ppo_update_loss`)."""
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.forward_with_branch_states(tokens, packed_seq_params)
        t1 = time.perf_counter()
        positions, selected_entropy, valid = select(out.logits, cfg, generator, packed_seq_params, lengths)
        t2 = time.perf_counter()
        rollouts = roll_out(model, out, positions, cfg, generator, eos_id)
        rewards, mask, advantages = group_advantages(cfg, positions, valid, labels, out.hidden, rollouts.tokens,
                                                     rollouts.hidden)
    metrics = _rollout_metrics(rewards, mask, selected_entropy, valid, rollouts, t1 - t0, t2 - t1)
    return StoredRollouts(positions, rollouts.tokens, rollouts.log_probs, advantages.contiguous(), mask,
                          {name: v.float().to(tokens.device) for name, v in metrics.items()})


def ppo_update_loss(model, tokens: torch.Tensor, labels: torch.Tensor, stored: StoredRollouts, cfg: RefineConfig,
                    ref_model=None, packed_seq_params: PackedSeqParams | None = None,
                    loss_mask: torch.Tensor | None = None, ntp_tokens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One PPO update over a stored rollout round's micro-batch: a fresh forward over the documents gives the NTP
    loss and the branch states after the stored positions, from which the current policy's log-probs of the
    stored rollout tokens are recomputed; the ratio to the round's log-probs is clipped as in the release."""
    out = model.forward_with_branch_states(tokens, packed_seq_params)
    ntp = ntp_loss(out.logits, labels, loss_mask, ntp_tokens)
    first_logits, cache = branch_starts(out, stored.positions, cfg.n)
    if cfg.detach_prefix:
        first_logits, cache = first_logits.detach(), cache.detach()
    log_probs, _ = rollout_log_probs(model, first_logits, cache, stored.tokens)
    pg, stats = policy_loss(cfg, log_probs, stored.old_log_probs, stored.advantages, stored.mask)
    loss = cfg.sft_coef * ntp + cfg.ppo_coef * pg
    kl = torch.zeros((), device=tokens.device)
    if ref_model is not None:
        ref = reference_log_probs(ref_model, tokens, stored.positions, stored.tokens, cfg.n, packed_seq_params)
        kl = token_mean(k3_kl(log_probs, ref), stored.mask)
        loss = loss + cfg.kl_coef * kl
    metrics = {**stored.metrics, "ntp_loss": ntp, "pg_loss": pg, "kl": kl, **stats}
    return loss, {name: v.detach().float().to(tokens.device) for name, v in metrics.items()}
