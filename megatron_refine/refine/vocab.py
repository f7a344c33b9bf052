"""Log-probabilities and entropies from vocab-parallel logits [..., V/t], without gathering the vocabulary.

megatron-core's vocab_parallel_cross_entropy subtracts the max from its input in place; these leave the
logits untouched (REFINE reads the same logits for NTP, selection and the first rollout token). The model's
logits are -inf on the vocabulary padding (`models.mask_padded_vocab`): those columns count for nothing here.
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
