"""Batched generation on the cached decoder: greedy, or sampled with temperature and top-p."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_refine.models.model import FastWeightGPTModel


def sample_tokens(
    logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [N, V] -> tokens [N]. top_p keeps the smallest set of tokens whose probability reaches p."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return sample_categorical(probs, generator)


def sample_categorical(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of weights [N, V] (non-negative, any scale) -> [N], without reading anything on the host.

    The exponential race: argmax(w / E) with E ~ Exp(1) i.i.d. picks index i with probability w_i / sum(w). It is
    what torch.multinomial(w, 1) computes after its argument checks, which read the weights on the host (two
    syncs per draw on CUDA); from the same generator state it draws the same indices. Rows of zeros give index 0.
    """
    race = torch.empty_like(weights, dtype=torch.float32).exponential_(1, generator=generator)
    return (weights.float() / race).argmax(-1)


def sampling_logits(logits: torch.Tensor, vocab_size: int, banned: int | None = None) -> torch.Tensor:
    """What the decoder samples from: vocab-parallel logits [N, V/t] -> the real vocabulary's [N, vocab_size] on
    every TP rank, with the `banned` id (REFINE's rollouts: EOS) at -inf. The logits themselves are unchanged."""
    full = gather_from_tensor_model_parallel_region(logits)[:, :vocab_size]
    if banned is None:
        return full
    full = full.clone()
    full[:, banned] = -torch.inf  # a fill by a Python index: no index tensor copied to the device (a sync on CUDA)
    return full


def same_on_tp_ranks(tokens: torch.Tensor) -> torch.Tensor:
    """Every TP rank must feed the same tokens: take tensor-parallel rank 0's."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            tokens, parallel_state.get_tensor_model_parallel_src_rank(),
            group=parallel_state.get_tensor_model_parallel_group(),
        )
    return tokens


@torch.no_grad()
def generate(
    model: FastWeightGPTModel,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """prompts [B, T] -> new tokens [B, max_new_tokens]: one prefill forward, then one cached step per token; no
    host read of a tensor (the decoder runs ahead of the GPU)."""
    B, T = prompts.shape
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pad = (-B) % tp if model.config.sequence_parallel else 0  # decoding rows split over TP under SP
    if pad:
        prompts = torch.cat([prompts, prompts[-1:].expand(pad, T)])
    logits, cache = model.prefill(prompts)
    tokens = []
    for i in range(max_new_tokens):
        full = sampling_logits(logits, model.tokenizer_vocab_size)
        next_tokens = same_on_tp_ranks(
            sample_tokens(full, temperature=temperature, top_p=top_p, greedy=greedy, generator=generator)
        )
        tokens.append(next_tokens)
        if i + 1 < max_new_tokens:
            logits, _ = model.step(next_tokens, cache)
    return torch.stack(tokens, dim=1)[:B]
