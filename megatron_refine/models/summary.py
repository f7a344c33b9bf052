"""Parameter counts of a model config, built on the meta device (no memory, no initialisation)."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.model import build_model


def parameter_counts(config: FastWeightConfig, vocab_size: int) -> dict[str, int]:
    """{'total', 'embedding', 'output_layer', 'per_layer', 'non_embedding'} for the whole model at TP=1, PP=1.

    Needs an initialised single-process Megatron parallel state (megatron_refine.runtime.initialize()).
    """
    config = replace(config, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        model = build_model(config, vocab_size, make_vocab_size_divisible_by=1)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    total = sum(p.numel() for p in model.parameters())
    embedding, output = counts.get("embedding", 0), counts.get("output_layer", 0)
    return {
        "total": total,
        "embedding": embedding,
        "output_layer": output,
        "per_layer": sum(p.numel() for p in model.decoder.layers[0].parameters()),
        "non_embedding": total - embedding - output,
    }
