"""Key-value recall on held-out documents of the built-in corpus: greedy-decode the value of a key stated
earlier in the document. Exact match of the value, and the fraction of its characters right (position by
position, surrounding whitespace excluded so the format alone earns nothing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megatron_refine.data.corpus import RecallExample
from megatron_refine.data.tokenizers import Tokenizer
from megatron_refine.models import FastWeightGPTModel, generate


@dataclass
class RecallResult:
    exact_match: float
    char_accuracy: float
    examples: int


@torch.no_grad()
def key_value_recall(model: FastWeightGPTModel, tokenizer: Tokenizer, examples: list[RecallExample]) -> RecallResult:
    """Each data-parallel rank decodes its share of the examples; the counts are summed over DP."""
    model.eval()
    device = next(model.parameters()).device
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # exact, chars right, chars total
    for ex in examples[rank::dp]:
        prompt = torch.tensor([tokenizer.encode(ex.prompt)], device=device)
        answer = tokenizer.encode(ex.answer)
        out = generate(model, prompt, len(answer), greedy=True)[0].tolist()
        got, want = tokenizer.decode(out).strip(), ex.answer.strip()
        counts += torch.tensor([got == want, sum(a == b for a, b in zip(got, want)), len(want)],
                               device=device, dtype=torch.float64)
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    model.train()
    return RecallResult(counts[0].item() / len(examples), counts[1].item() / max(counts[2].item(), 1), len(examples))
