"""What the format modules (`deltanet.py`, `lact.py`) share: refusing config.json options our mixers lack, and
writing an imported config as a preset plus the fields that differ."""

from __future__ import annotations

from dataclasses import fields

from megatron_refine.models.config import FastWeightConfig, get_config


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
