"""What the format modules (`deltanet.py`, `gated_deltanet.py`, `lact.py`) share: refusing config.json options our
mixers lack, writing an imported config as a preset plus the fields that differ, and the config.json fields of fla's
models that are not the mixer's (MLP, norms, vocabulary, special tokens)."""

from __future__ import annotations

from dataclasses import fields

import torch

from megatron_refine.models.config import FastWeightConfig, fla_intermediate_size, get_config


def check_supported(config: dict, model_type: str, unsupported: tuple, what: str) -> None:
    """Refuse a config.json of another model_type, or setting an option of `unsupported` ((field, allowed values
    (the first is the format's default, for a config.json without the field), what the option is)) otherwise."""
    if config.get("model_type") != model_type:
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}; this converter reads {what} "
                         f"({model_type!r}) checkpoints")
    for name, allowed, option in unsupported:
        if config.get(name, allowed[0]) not in allowed:
            raise ValueError(f"config.json sets {name}={config[name]!r} ({option}), which megatron-refine does not "
                             f"implement: only {what} checkpoints without that option convert")


def preset_overrides(base: str, values: dict) -> dict:
    """The FastWeightConfig overrides of preset `base` that give `values`; the config's own checks run on them
    (head divisibility, head dims, ...)."""
    preset = get_config(base)
    known = {f.name for f in fields(FastWeightConfig)}
    overrides = {k: v for k, v in values.items() if k in known and getattr(preset, k) != v}
    get_config(base, **overrides)
    return overrides


def pad_token_id(config: dict, vocab_default: int) -> int | None:
    """config.json's pad_token_id when it names a row of the vocabulary, else None: the model config's
    `pad_token_id`, whose embedding row fine-tuning keeps as the HF model's padding_idx does."""
    pad, vocab = config.get("pad_token_id"), config.get("vocab_size", vocab_default)
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < vocab else None


def fla_model_config(cfg: FastWeightConfig, vocab_size: int, token_ids: dict, dtype: torch.dtype) -> dict:
    """The config.json fields of an fla model (`DeltaNetConfig`, `GatedDeltaNetConfig`) outside its mixer."""
    if cfg.layernorm_zero_centered_gamma:
        raise ValueError("this model's norms are zero-centered (layernorm_zero_centered_gamma, stored as gamma - 1), "
                         "fla's store gamma: it does not export to an fla format")
    return {
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_ratio": 4,
        "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "swish", "num_hidden_layers": cfg.num_layers,
        "norm_eps": cfg.layernorm_epsilon, "vocab_size": vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": token_ids.get("bos_token_id"), "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"), "initializer_range": cfg.init_method_std,
        "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def fla_model_values(config: dict, num_layers: int) -> dict:
    """FastWeightConfig values of an fla config.json outside its mixer (defaults: fla's config classes')."""
    h = config.get("hidden_size", 2048)
    return dict(
        num_layers=config.get("num_hidden_layers", num_layers), hidden_size=h,
        ffn_hidden_size=config.get("intermediate_size") or fla_intermediate_size(h, config.get("hidden_ratio") or 4),
        layernorm_epsilon=config.get("norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False), pad_token_id=pad_token_id(config, 32000),
    )
