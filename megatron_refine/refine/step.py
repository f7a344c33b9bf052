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
from megatron_refine.models.context_parallel import whole_rows
from megatron_refine.models.losses import (
    context_parallel_sum, ntp_loss, vocab_parallel_entropy, vocab_parallel_log_probs)
from megatron_refine.models.model import BranchOutput
from megatron_refine.models.packing import Packing
from megatron_refine.refine.config import RefineConfig
from megatron_refine.refine.grpo import grpo_advantages, k3_kl, ppo_clipped_loss
from megatron_refine.refine.rewards import rollout_rewards
from megatron_refine.refine.selection import chunks_with_candidates, eligible_positions, select_positions


@dataclass
class Rollouts:
    """This rank's rollouts: all R of them, or under context parallelism its `Placement`'s R_own rows."""

    positions: torch.Tensor  # [B, P]: the branch positions (the placement's: in this rank's piece)
    tokens: torch.Tensor  # [R, k], R = B * P * n, rows ordered (b, p, sample)
    log_probs: torch.Tensor  # [R, k], the training forward's, differentiable through the branch states
    sampler_log_probs: torch.Tensor  # [R, k], the decoder's, as it sampled them (no graph)
    hidden: torch.Tensor  # [R, k, h], after each rollout token (last layer, final norm), detached
    seconds: dict[str, float]  # host time: "branch" (reading the states), "decode", "score"


def select(logits: torch.Tensor, cfg: RefineConfig, generator: torch.Generator,
           packed_seq_params: PackedSeqParams | None = None, lengths: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's logits [B, T, V/t] (detached; under context parallelism this rank's piece [B, T / c, V/t], the
    entropy then gathered: every rank draws the same positions) -> next-token entropy [B, T] -> positions
    [B, n_chunks], their entropies, and which of them are valid [B, n_chunks] (with packed documents or short rows a chunk may hold no
    position whose rollout fits). lengths [B]: each row's real labels (a padded document, a post-training prompt;
    the rest is padding or an answer): the chunks split that part only, and every rollout and its truth (and
    `margin` tokens more) stay in it."""
    with torch.no_grad():
        entropy = whole_rows(vocab_parallel_entropy(logits.detach()))  # [B, T]: every CP piece's
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


@dataclass
class Placement:
    """Which of a micro-batch's R = B x P x n rollout rows this rank reads, decodes and scores. Under context
    parallelism a position's rollouts run on the rank whose piece holds it, where its branch state is read; with
    n_chunks a multiple of CP the ranks hold equal shares. Each rank's rows are [B, P'] positions (P' the most a row
    has here) times n: a row with fewer is padded with copies of a position of its own, decoded and thrown away, so
    the branch caches keep one forward row per P' x n rows (attention reads its prefix once for them). Without CP,
    every row."""

    positions: torch.Tensor  # [B, P']: the positions in this rank's piece (P' = P without CP)
    rows: torch.Tensor  # [B P' n]: each of this rank's rows' index into the R rows ordered (b, p, sample); -1: padding
    total: int  # R
    split: bool = False  # over context-parallel ranks: the rows are gathered from every rank's share

    @classmethod
    def whole(cls, positions: torch.Tensor, n: int) -> Placement:
        """Every rollout of positions [B, P] on this rank."""
        rows = positions.numel() * n
        return cls(positions, torch.arange(rows, device=positions.device), rows)

    @classmethod
    def of(cls, positions: torch.Tensor, n: int, piece: int) -> Placement:
        """positions [B, P] in the whole rows; `piece`: each CP rank's share of a row's tokens."""
        if parallel_state.get_context_parallel_world_size() == 1:
            return cls.whole(positions, n)
        B, P = positions.shape
        device = positions.device
        first = parallel_state.get_context_parallel_rank() * piece
        own = (positions >= first) & (positions < first + piece)  # [B, P]
        count = own.sum(1)
        # A host read, once per micro-batch. At least one: a rank whose piece holds no position decodes a padding
        # row, so every CP rank builds the same graph and its backward enters the same collectives in the same order.
        width = max(int(count.max()), 1)
        order = torch.argsort((~own).to(torch.int8), dim=1, stable=True)[:, :width]  # own positions first, in order
        kept = torch.arange(width, device=device) < count[:, None]  # [B, width]
        order = torch.where(kept, order, order[:, :1])  # padding: the row's first own position (or any, if none)
        local = (positions.gather(1, order) - first).clamp(0, piece - 1)
        index = torch.where(kept, torch.arange(B, device=device)[:, None] * P + order, -1)  # into the B x P
        rows = torch.where(index[..., None] >= 0, index[..., None] * n + torch.arange(n, device=device), -1)
        return cls(local, rows.flatten(), B * P * n, split=True)

    @property
    def count(self) -> int:
        """How many rows this rank decodes (padding included)."""
        return self.rows.numel()

    def spread(self, own: torch.Tensor) -> torch.Tensor:
        """This rank's rows' values [count, ...] in place among all R rows (zeros elsewhere) [R, ...]."""
        if not self.split:
            return own
        real = self.rows >= 0
        return own.new_zeros(self.total, *own.shape[1:]).index_copy(0, self.rows[real], own[real])

    def gather(self, own: torch.Tensor) -> torch.Tensor:
        """Every rank's rows' values [R, ...] from each rank's own [count, ...], the same on every CP rank, without a
        graph: what the rewards, the advantages and the statistics read."""
        if not self.split:
            return own
        every = self.spread(own.detach())
        torch.distributed.all_reduce(every, group=parallel_state.get_context_parallel_group())
        return every

    def mine(self, every: torch.Tensor) -> torch.Tensor:
        """Rows [R, ...] -> this rank's [count, ...]; zeros (False) in the padding rows."""
        if not self.split:
            return every
        real = (self.rows >= 0).view(-1, *[1] * (every.dim() - 1))
        return torch.where(real, every[self.rows.clamp(min=0)], torch.zeros((), dtype=every.dtype, device=every.device))


def branch_starts(out: BranchOutput, where: Placement | torch.Tensor, n: int):
    """Where every rollout of this rank starts (`where`: a placement, or positions [B, P] all here): the logits at
    each position (predicting its first token) and the decoding state after it, each repeated for the n rollouts of
    a position -> (logits [R_own, V/t], cache of R_own rows)."""
    positions = where.positions if isinstance(where, Placement) else where
    b = torch.arange(positions.shape[0], device=positions.device)[:, None]
    logits = out.logits[b, positions].flatten(0, 1).repeat_interleave(n, dim=0)
    cache = out.states_after(positions)
    return logits, (cache.repeat_interleave(n) if n > 1 else cache)


def roll_out(model, out: BranchOutput, where: Placement | torch.Tensor, cfg: RefineConfig,
             generator: torch.Generator, eos_id: int | None = None) -> Rollouts:
    """k tokens from every branch state of this rank (n samples each): sampled by the decoder, scored by the training
    forward (`where`: a placement, or positions [B, P] all here). eos_id: never sampled (every rollout has k tokens,
    as the release's min_new_tokens = k); None bans nothing. Each draw is made over all R rows (zeros in the other CP ranks' rows), so it is the one a single rank
    would make: the sampler's random numbers depend only on the generator and the shape.
    Rollouts.seconds: host time of reading the branch states, of the decoding and of the scoring forward."""
    placement = where if isinstance(where, Placement) else Placement.whole(where, cfg.n)
    t0 = time.perf_counter()
    first_logits, cache = branch_starts(out, placement, cfg.n)  # in the graph
    if cfg.detach_prefix:  # the ablation: no policy gradient into the prefix's forward and fast-weight writes
        first_logits, cache = first_logits.detach(), cache.detach()
    t1 = time.perf_counter()
    tokens, sampler_log_probs = [], []
    with torch.no_grad():
        logits, decoding = first_logits.detach(), cache.detach()
        step = _decoder(model, decoding, placement.count)
        for j in range(cfg.k):  # every CP rank draws the same numbers, for all R rows
            full = sampling_logits(placement.spread(logits), model.tokenizer_vocab_size, banned=eos_id)
            drawn = sample_tokens(full, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
            token = placement.mine(same_on_tp_ranks(drawn))
            tokens.append(token)
            sampler_log_probs.append(vocab_parallel_log_probs(logits, token))
            if j < cfg.k - 1:
                logits = step(token)
    tokens = torch.stack(tokens, 1)  # [R_own, k]
    t2 = time.perf_counter()
    log_probs, hidden = rollout_log_probs(model, first_logits, cache, tokens)
    seconds = {"branch": t1 - t0, "decode": t2 - t1, "score": time.perf_counter() - t2}
    return Rollouts(placement.positions, tokens, log_probs, torch.stack(sampler_log_probs, 1), hidden.detach(), seconds)


def _decoder(model, cache, rows: int):
    """token [rows] -> the logits after it [rows, V/t], decoding on from `cache`. Under sequence parallelism the
    decoder's rows must be a multiple of TP: a context-parallel rank's share is padded with copies of its first row."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pad = (-rows) % tp if model.config.sequence_parallel else 0
    if pad:
        rows_padded = torch.arange(rows + pad, device=cache.positions.device)
        cache = cache.select(torch.where(rows_padded < rows, rows_padded, 0))

    def step(token: torch.Tensor) -> torch.Tensor:
        logits, _ = model.step(torch.cat([token, token[:1].expand(pad)]) if pad else token, cache)
        return logits[:rows]

    return step


def rollout_log_probs(model, first_logits: torch.Tensor, cache, tokens: torch.Tensor):
    """The training forward's log-probs [R, k] of rollout tokens [R, k] from their branch starts (the logits
    predicting the first token, the states after the prefix), differentiable through both, and the hidden
    states [R, k, h] after each token (`forward_from_cache`: the chunked kernels from the branch states)."""
    logits, hidden = model.forward_from_cache(tokens, cache)  # [R, k, V/t]: predictions after each rollout token
    log_probs = torch.cat([vocab_parallel_log_probs(first_logits, tokens[:, 0])[:, None],
                           vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:])], dim=1)
    return log_probs, hidden


def reference_log_probs(ref_model, tokens: torch.Tensor, placement: Placement, rollout_tokens: torch.Tensor,
                        n: int, packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
    """The frozen reference's log-probs of the same rollout tokens (this rank's), by the same branched training
    forward over tokens [B, T] (this rank's piece under context parallelism)."""
    with torch.no_grad():
        out = ref_model.forward_with_branch_states(tokens, packed_seq_params)
        return rollout_log_probs(ref_model, *branch_starts(out, placement, n), rollout_tokens)[0]


def logprob_parity(log_probs: torch.Tensor, sampler_log_probs: torch.Tensor, mask: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """Decoder vs training forward on the same rollout tokens: log-probs [R, k] of both, mask [R] the rollouts that
    count."""
    diff = (log_probs.detach() - sampler_log_probs)[mask]  # [valid, k]
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
                     truth_hidden_states: torch.Tensor, rollout_tokens: torch.Tensor, rollout_hidden: torch.Tensor,
                     placement: Placement | None = None):
    """Rewards [R] of the rollouts against the true continuations, which of them count [R] (`valid`, per
    position, repeated n times), and their GRPO advantages [R, k], of all R rows. Groups: the n_chunks rollouts of
    one row (n = 1), or the n rollouts of one position; with packed documents a row's group spans its documents,
    like the positions of one long document do. Under context parallelism (`placement`) the rollouts [R_own, k] and
    truth_hidden_states [B, T / c, h] are this rank's, gathered here: every CP rank computes every group alike."""
    B, P = positions.shape
    k = rollout_tokens.shape[1]
    b = torch.arange(B, device=labels.device)[:, None, None]
    steps = positions[..., None] + torch.arange(k, device=labels.device)  # [B, P, k]
    truth = labels[b, steps].flatten(0, 1).repeat_interleave(cfg.n, dim=0)  # x_{p+1..p+k}
    truth_hidden = hidden_at(truth_hidden_states, steps + 1)  # [B, P, k, h]: after x_{p+j}
    truth_hidden = truth_hidden.flatten(0, 1).repeat_interleave(cfg.n, dim=0)
    if placement is not None:
        rollout_tokens, rollout_hidden = placement.gather(rollout_tokens), placement.gather(rollout_hidden)
    R = rollout_tokens.shape[0]
    rewards = rollout_rewards(cfg.reward, rollout_tokens, truth, rollout_hidden, truth_hidden)  # [R]
    mask = valid.reshape(-1).repeat_interleave(cfg.n)  # [R]
    group_shape = (B, P * cfg.n) if cfg.n == 1 else (B * P, cfg.n)
    advantages = grpo_advantages(rewards.view(group_shape), mask=mask.view(group_shape)).reshape(R, 1).expand(R, k)
    return rewards, mask, advantages


def hidden_at(hidden: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, h] at steps [B, ...] of the whole rows -> [B, ..., h]. Under context parallelism hidden is this
    rank's piece [B, T / c, h]: each rank reads the steps in its piece, and the CP ranks sum (no graph)."""
    b = torch.arange(steps.shape[0], device=steps.device).view(-1, *[1] * (steps.dim() - 1))
    if parallel_state.get_context_parallel_world_size() == 1:
        return hidden[b, steps]
    piece = hidden.shape[1]
    local = steps - parallel_state.get_context_parallel_rank() * piece
    inside = (local >= 0) & (local < piece)
    values = hidden.detach()[b, local.clamp(0, piece - 1)] * inside[..., None].to(hidden.dtype)
    torch.distributed.all_reduce(values, group=parallel_state.get_context_parallel_group())
    return values


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of per-token values over every DP rank's counted tokens, as this rank's share: DDP averages
    gradients over DP, so each rank's sum is scaled by DP size / the global count. per_token [R, k]; mask [R]
    (rollouts: all k tokens of a counted row) or per_token's shape (token weights). Under context parallelism each CP
    rank holds its own rows: the count sums over DP x CP (Megatron's schedule multiplies the loss by the CP size)."""
    weights = mask.to(per_token.dtype)
    if weights.dim() < per_token.dim():
        weights = weights[:, None].expand_as(per_token)
    total = weights.sum().to(torch.float32).clone()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    scale = parallel_state.get_data_parallel_world_size() / total.clamp(min=1)
    return (per_token * weights).sum() * scale


def policy_loss(cfg: RefineConfig, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, placement: Placement | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dual-clip PPO loss as a token mean over every DP rank's counted rollout tokens (DDP then averages
    gradients over DP), and its statistics against the old log-probs: clipped fraction, approximate (k3) KL
    between old and new policy, mean ratio. log_probs, old_log_probs, advantages [R, k]; mask [R]: this rank's rows
    (`placement`'s, whose statistics are then those of every CP rank's rows)."""
    per_token, clipped = ppo_clipped_loss(log_probs, old_log_probs, advantages,
                                          eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)
    loss = token_mean(per_token, mask)
    if placement is not None:
        gather = placement.gather
        log_probs, old_log_probs = gather(log_probs), gather(old_log_probs)
        clipped, mask = gather(clipped.to(log_probs.dtype)) > 0, gather(mask.to(log_probs.dtype)) > 0
    zero = torch.zeros((), device=log_probs.device)
    new = log_probs.detach()[mask]
    old = old_log_probs[mask]
    stats = {
        "clip_fraction": clipped[mask].float().mean() if mask.any() else zero,
        "approx_kl": k3_kl(new, old).mean() if mask.any() else zero,
        "ppo_ratio_mean": (new - old).exp().mean() if mask.any() else zero + 1,
        "rollout_tokens": (mask.sum() * log_probs.shape[1]).float(),
    }
    return loss, stats


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
    Under context parallelism every CP rank takes the whole rows and runs its piece (`context_parallel_piece`); the
    positions are drawn over the whole rows, and each is rolled out on the rank that holds it (`Placement`).
    """
    t0 = time.perf_counter()
    piece, cut = context_parallel_piece(tokens.shape[1])
    out = model.forward_with_branch_states(cut(tokens), packed_seq_params)
    ntp = ntp_loss(out.logits, cut(labels), cut(loss_mask), ntp_tokens)
    t1 = time.perf_counter()
    positions, selected_entropy, valid = select(out.logits, cfg, generator, packed_seq_params, lengths)
    placement = Placement.of(positions, cfg.n, piece)
    t2 = time.perf_counter()
    rollouts = roll_out(model, out, placement, cfg, generator, eos_id)
    rewards, mask, advantages = group_advantages(cfg, positions, valid, labels, out.hidden.detach(),
                                                 rollouts.tokens, rollouts.hidden, placement)
    own_mask = placement.mine(mask)
    pg, stats = policy_loss(cfg, rollouts.log_probs, rollouts.log_probs.detach(), placement.mine(advantages),
                            own_mask, placement)
    loss = cfg.sft_coef * ntp + cfg.ppo_coef * pg
    kl = torch.zeros((), device=tokens.device)
    if ref_model is not None:
        ref = reference_log_probs(ref_model, cut(tokens), placement, rollouts.tokens, cfg.n, packed_seq_params)
        kl = token_mean(k3_kl(rollouts.log_probs, ref), own_mask)
        loss = loss + cfg.kl_coef * kl
    shares = {"ntp_loss": ntp, "pg_loss": pg, "kl": kl}
    metrics = {**{name: context_parallel_sum(v.detach().clone()) for name, v in shares.items()}, **stats,
               **_rollout_metrics(rewards, mask, selected_entropy, valid, rollouts, placement, t1 - t0, t2 - t1)}
    return loss, {name: v.detach().float().to(tokens.device) for name, v in metrics.items()}


def context_parallel_piece(length: int):
    """Rows of `length` tokens -> (this CP rank's share of a row, a function cutting [B, length] tensors (or None) to
    its piece); the rows themselves without context parallelism."""
    c = parallel_state.get_context_parallel_world_size()
    if c == 1:
        return length, lambda t: t
    piece = length // c
    first = parallel_state.get_context_parallel_rank() * piece
    return piece, lambda t: None if t is None else t[:, first:first + piece]


# The phases of a step (or a rollout round) timed on the host, as metrics `time_<phase>`: the forward over the
# documents (with the NTP loss), choosing the positions and reading the states after them, the k - 1 decode
# steps, the scoring forward over the rollout tokens (log-probs). Rewards and the loss follow in microseconds.
STEP_PHASES = ("forward", "select", "rollout", "score")


def _rollout_metrics(rewards, mask, selected_entropy, valid, rollouts: Rollouts, placement: Placement,
                     forward_s: float, select_s: float) -> dict[str, torch.Tensor]:
    """Rewards, selection, log-prob parity (of every CP rank's rollouts), and the host time of each phase
    (`STEP_PHASES`)."""
    counted = rewards[mask]
    zero = torch.zeros((), device=rewards.device)
    seconds = {"forward": forward_s, "select": select_s + rollouts.seconds["branch"],
               "rollout": rollouts.seconds["decode"], "score": rollouts.seconds["score"]}
    log_probs, sampler_log_probs = placement.gather(rollouts.log_probs), placement.gather(rollouts.sampler_log_probs)
    return {
        "reward_mean": counted.mean() if counted.numel() else zero,
        "reward_std": counted.std() if counted.numel() > 1 else zero,
        "selected_entropy": selected_entropy[valid].mean() if valid.any() else zero,
        **{f"time_{phase}": torch.tensor(seconds[phase]) for phase in STEP_PHASES},
        **logprob_parity(log_probs, sampler_log_probs, mask),
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
    half of a step, stored for the `mini_batches` PPO updates that follow (`ppo_update_loss`). Every CP rank stores
    all R rows."""
    with torch.no_grad():
        t0 = time.perf_counter()
        piece, cut = context_parallel_piece(tokens.shape[1])
        out = model.forward_with_branch_states(cut(tokens), packed_seq_params)
        t1 = time.perf_counter()
        positions, selected_entropy, valid = select(out.logits, cfg, generator, packed_seq_params, lengths)
        placement = Placement.of(positions, cfg.n, piece)
        t2 = time.perf_counter()
        rollouts = roll_out(model, out, placement, cfg, generator, eos_id)
        rewards, mask, advantages = group_advantages(cfg, positions, valid, labels, out.hidden, rollouts.tokens,
                                                     rollouts.hidden, placement)
    metrics = _rollout_metrics(rewards, mask, selected_entropy, valid, rollouts, placement, t1 - t0, t2 - t1)
    return StoredRollouts(positions, placement.gather(rollouts.tokens), placement.gather(rollouts.log_probs),
                          advantages.contiguous(), mask,
                          {name: v.float().to(tokens.device) for name, v in metrics.items()})


def ppo_update_loss(model, tokens: torch.Tensor, labels: torch.Tensor, stored: StoredRollouts, cfg: RefineConfig,
                    ref_model=None, packed_seq_params: PackedSeqParams | None = None,
                    loss_mask: torch.Tensor | None = None, ntp_tokens: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One PPO update over a stored rollout round's micro-batch: a fresh forward over the documents gives the NTP
    loss and the branch states after the stored positions, from which the current policy's log-probs of the
    stored rollout tokens are recomputed; the ratio to the round's log-probs is clipped as in the release."""
    piece, cut = context_parallel_piece(tokens.shape[1])
    out = model.forward_with_branch_states(cut(tokens), packed_seq_params)
    ntp = ntp_loss(out.logits, cut(labels), cut(loss_mask), ntp_tokens)
    placement = Placement.of(stored.positions, cfg.n, piece)
    first_logits, cache = branch_starts(out, placement, cfg.n)
    if cfg.detach_prefix:
        first_logits, cache = first_logits.detach(), cache.detach()
    rollout_tokens, mask = placement.mine(stored.tokens), placement.mine(stored.mask)
    log_probs, _ = rollout_log_probs(model, first_logits, cache, rollout_tokens)
    pg, stats = policy_loss(cfg, log_probs, placement.mine(stored.old_log_probs), placement.mine(stored.advantages),
                            mask, placement)
    loss = cfg.sft_coef * ntp + cfg.ppo_coef * pg
    kl = torch.zeros((), device=tokens.device)
    if ref_model is not None:
        ref = reference_log_probs(ref_model, cut(tokens), placement, rollout_tokens, cfg.n, packed_seq_params)
        kl = token_mean(k3_kl(log_probs, ref), mask)
        loss = loss + cfg.kl_coef * kl
    shares = {"ntp_loss": ntp, "pg_loss": pg, "kl": kl}
    metrics = {**stored.metrics, **{name: context_parallel_sum(v.detach().clone()) for name, v in shares.items()},
               **stats}
    return loss, {name: v.detach().float().to(tokens.device) for name, v in metrics.items()}
