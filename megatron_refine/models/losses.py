"""The language model's token losses over its vocab-parallel logits [..., V/t], without gathering the vocabulary.

These sit with the model, below REFINE and the trainer: plain NTP training (`training/`), REFINE's NTP term and
policy log-probs (`refine/`) and scoring (`evaluation/`) all read them. megatron-core's
vocab_parallel_cross_entropy subtracts the max from its input in place; these leave the logits untouched (REFINE
reads the same logits for NTP, selection and the first rollout token). The model's logits are -inf on the
vocabulary padding (`models.mask_padded_vocab`): those columns count for nothing here.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region


def _global_max(logits: torch.Tensor) -> torch.Tensor:
    m = logits.detach().float().max(dim=-1).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    return m


def vocab_parallel_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], differentiable: logits [..., V/t], tokens [...] -> [...] (fp32)."""
    z = logits.float() - _global_max(logits)[..., None]  # a constant shift: no gradient through the max
    log_norm = reduce_from_tensor_model_parallel_region(z.exp().sum(-1)).log()
    local = logits.shape[-1]
    index = tokens - parallel_state.get_tensor_model_parallel_rank() * local
    here = (index >= 0) & (index < local)
    picked = torch.where(here, z.gather(-1, index.clamp(0, local - 1)[..., None])[..., 0], 0.0)  # may read -inf
    return reduce_from_tensor_model_parallel_region(picked) - log_norm


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the full vocabulary: [..., V/t] -> [...] (fp32)."""
    z = logits.float() - _global_max(logits)[..., None]
    e = z.exp()
    sums = torch.stack([e.sum(-1), torch.where(e > 0, e * z, 0.0).sum(-1)])  # 0 * -inf: 0, not NaN
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
    return sums[0].log() - sums[1] / sums[0]


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token values [B, T] under weights [B, T] (all ones when None)."""
    if mask is None:
        return per_token.float().mean()
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


def mean_loss(per_token: torch.Tensor, mask: torch.Tensor | None = None, tokens: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Per-token losses [B, T] under weights [B, T] (all ones when None): this rank's mean, or given `tokens`, the
    step's counted tokens on every DP rank divided by its micro-batches, this micro-batch's share of the mean over
    all of them (Megatron's schedule averages micro-batches, DDP averages DP ranks): rows of unequal lengths, such
    as prompts and answers, then weigh by their tokens however they are split into micro-batches and ranks.
    Under context parallelism per_token and mask are this rank's piece of the rows, and the result its piece's share
    of the rows' mean (without `tokens`, of the micro-batch's: its count summed over CP): Megatron's schedule
    multiplies the loss by the CP size, and DDP averages over the CP ranks too."""
    if tokens is None and parallel_state.get_context_parallel_world_size() > 1:
        tokens = (torch.ones_like(per_token) if mask is None else mask).sum().float()
        torch.distributed.all_reduce(tokens, group=parallel_state.get_context_parallel_group())
        return (per_token.float() * (1 if mask is None else mask)).sum() / tokens.clamp(min=1)
    if tokens is None:
        return masked_mean(per_token, mask)
    weights = torch.ones_like(per_token) if mask is None else mask
    return (per_token.float() * weights).sum() * parallel_state.get_data_parallel_world_size() / tokens.clamp(min=1)


def context_parallel_sum(share: torch.Tensor) -> torch.Tensor:
    """A loss share of this rank's piece of the rows (`mean_loss`) -> of the whole rows, the same on every CP rank:
    what a metric reports. In place."""
    if parallel_state.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(share, group=parallel_state.get_context_parallel_group())
    return share


def ntp_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
             tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of logits [B, T, V/t] against labels [B, T] under loss_mask [B, T] (`mean_loss`)."""
    return mean_loss(-vocab_parallel_log_probs(logits, labels), loss_mask, tokens)


__all__ = ["context_parallel_sum", "masked_mean", "mean_loss", "ntp_loss", "vocab_parallel_entropy", "vocab_parallel_log_probs"]
