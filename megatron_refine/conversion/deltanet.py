"""DeltaNet <-> fla's `delta_net` Hugging Face format: config fields and tensor names
(../shared/specs/architectures.md).

Megatron fuses what fla keeps apart: `in_proj` = cat[q | k | v | beta | gate] along dim 0, `conv1d` =
cat[q | k | v] channels ([C, 1, W], the shape of fla's ShortConvolution weights), `linear_fc1` = cat[gate | up].
The mapping works on whole (TP=1) tensors: the checkpoint code reshards before and after.
"""

from __future__ import annotations

import torch

from megatron_refine.conversion.common import check_supported, fla_model_config, fla_model_values, preset_overrides
from megatron_refine.models.config import FastWeightConfig

MODEL_TYPE = "delta_net"
DESCRIPTION = "fla's DeltaNet"
BASE_PRESET = "deltanet_1p3b"  # imports are written as this preset plus the fields that differ

# fla DeltaNetConfig fields whose value our mixer cannot reproduce: (field, allowed values (the first is fla's
# default, for a config.json without the field), why).
UNSUPPORTED = (
    ("attn", (None, {}), "hybrid softmax-attention layers"),
    ("attnres_block_size", (None,), "attention residuals (attnres)"),
    ("hidden_act", ("swish", "silu"), "an MLP activation other than SiLU"),
    ("conv_bias", (None, False), "short-convolution biases"),
    ("norm_first", (False, None), "fla's norm_first block layout (removed in 2025-02)"),
)


def mixer_pieces(cfg: FastWeightConfig) -> list[tuple[str, int]]:
    """fla's projections fused in Megatron's in_proj, in order: (fla name, rows)."""
    pieces = [("q_proj", cfg.key_dim), ("k_proj", cfg.key_dim), ("v_proj", cfg.value_dim)]
    pieces += [("b_proj", cfg.num_attention_heads)] if cfg.use_beta else []
    pieces += [("g_proj", cfg.value_dim)] if cfg.use_gate else []
    return pieces


def conv_pieces(cfg: FastWeightConfig) -> list[tuple[str, int]]:
    return [("q_conv1d", cfg.key_dim), ("k_conv1d", cfg.key_dim), ("v_conv1d", cfg.value_dim)]


def layer_to_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's fla tensors; `get(megatron name)` returns a whole Megatron tensor."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {f"{h}attn_norm.weight": get(f"{m}input_layernorm.weight")}
    rows = get(f"{m}self_attention.in_proj.weight").split([n for _, n in mixer_pieces(cfg)])
    out.update({f"{h}attn.{name}.weight": w for (name, _), w in zip(mixer_pieces(cfg), rows)})
    if cfg.use_short_conv:
        conv = get(f"{m}self_attention.conv1d.weight").split([n for _, n in conv_pieces(cfg)])  # each [C, 1, W]
        out.update({f"{h}attn.{name}.weight": w for (name, _), w in zip(conv_pieces(cfg), conv)})
    out[f"{h}attn.o_norm.weight"] = get(f"{m}self_attention.o_norm.weight")
    out[f"{h}attn.o_proj.weight"] = get(f"{m}self_attention.out_proj.weight")
    out[f"{h}mlp_norm.weight"] = get(f"{m}pre_mlp_layernorm.weight")
    gate, up = get(f"{m}mlp.linear_fc1.weight").chunk(2)
    out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = gate, up
    out[f"{h}mlp.down_proj.weight"] = get(f"{m}mlp.linear_fc2.weight")
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's Megatron tensors; `get(fla name)` returns a tensor of the HF checkpoint."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {
        f"{m}input_layernorm.weight": get(f"{h}attn_norm.weight"),
        f"{m}self_attention.in_proj.weight": torch.cat([get(f"{h}attn.{n}.weight") for n, _ in mixer_pieces(cfg)]),
        f"{m}self_attention.o_norm.weight": get(f"{h}attn.o_norm.weight"),
        f"{m}self_attention.out_proj.weight": get(f"{h}attn.o_proj.weight"),
        f"{m}pre_mlp_layernorm.weight": get(f"{h}mlp_norm.weight"),
        f"{m}mlp.linear_fc1.weight": torch.cat([get(f"{h}mlp.gate_proj.weight"), get(f"{h}mlp.up_proj.weight")]),
        f"{m}mlp.linear_fc2.weight": get(f"{h}mlp.down_proj.weight"),
    }
    if cfg.use_short_conv:
        out[f"{m}self_attention.conv1d.weight"] = torch.cat([get(f"{h}attn.{n}.weight") for n, _ in conv_pieces(cfg)])
    return out


def hf_names(cfg: FastWeightConfig) -> list[str]:
    """Every tensor name of the fla checkpoint (lm_head only when untied), for missing/unexpected checks."""
    layer = ["attn_norm", *(f"attn.{n}" for n, _ in mixer_pieces(cfg)), "attn.o_norm", "attn.o_proj", "mlp_norm",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    layer += [f"attn.{n}" for n, _ in conv_pieces(cfg)] if cfg.use_short_conv else []
    names = ["model.embeddings.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    return names + [f"model.layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in layer]


def hf_config(cfg: FastWeightConfig, vocab_size: int, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of fla's DeltaNetConfig for a Megatron model config."""
    if not cfg.use_output_norm:
        raise ValueError("use_output_norm=false has no fla equivalent (fla's DeltaNet always applies o_norm): "
                         "only models trained with the output norm export to delta_net")
    return {
        "architectures": ["DeltaNetForCausalLM"], "model_type": MODEL_TYPE, "attn_mode": "chunk",
        "hidden_size": cfg.hidden_size, "expand_k": cfg.expand_k, "expand_v": cfg.expand_v, "use_gate": cfg.use_gate,
        "use_short_conv": cfg.use_short_conv, "conv_size": cfg.conv_size, "use_beta": cfg.use_beta,
        "use_output_norm": True, "allow_neg_eigval": cfg.allow_neg_eigval, "num_heads": cfg.num_attention_heads,
        "qk_norm": cfg.qk_norm, "qk_activation": cfg.qk_activation, **fla_model_config(cfg, vocab_size, token_ids, dtype),
    }


def megatron_model_args(config: dict) -> tuple[str, dict]:
    """(preset name, FastWeightConfig overrides) for an fla config.json; refuses what our mixer lacks."""
    check_supported(config, MODEL_TYPE, UNSUPPORTED, "fla's DeltaNet")
    values = dict(
        mixer="deltanet", **fla_model_values(config, num_layers=24), num_attention_heads=config.get("num_heads", 16),
        expand_k=float(config.get("expand_k", 1.0)), expand_v=float(config.get("expand_v", 1.0)),
        use_gate=config.get("use_gate", False), use_short_conv=config.get("use_short_conv", True),
        conv_size=config.get("conv_size", 4), use_beta=config.get("use_beta", True),
        qk_norm=config.get("qk_norm", "l2"), qk_activation=config.get("qk_activation", "silu"),
        allow_neg_eigval=config.get("allow_neg_eigval", False),
        use_output_norm=True,  # fla 0.6.0 ignores the field: its layer always applies o_norm
    )
    return BASE_PRESET, preset_overrides(BASE_PRESET, values)


def token_ids(config: dict) -> dict:
    return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
