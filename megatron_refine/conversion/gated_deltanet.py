"""Gated DeltaNet <-> fla's `gated_deltanet` Hugging Face format: config fields and tensor names.

Our mixer keeps megatron-core GatedDeltaNet's parameters, which fuse what fla keeps apart: `in_proj` =
cat[q | k | v | z (the output gate) | beta | alpha] along dim 0 (fla's q_proj, k_proj, v_proj, g_proj, b_proj,
a_proj), `conv1d` = cat[q | k | v] channels ([C, 1, W], the shape of fla's ShortConvolution weights);
`linear_fc1` = cat[gate | up]. Both apply the same math: SiLU after the conv, L2-normalised q and k, 1/sqrt(Dk)
scale, beta = sigmoid(b), log decay g = -exp(A_log) * softplus(a + dt_bias), value head j reading key head
j // (Hv / Hk), RMSNorm(o) * SiLU(z) per value head. The mapping works on whole (TP=1) tensors: the checkpoint code
reshards before and after.
"""

from __future__ import annotations

import math

import torch

from megatron_refine.conversion.common import check_supported, fla_model_config, fla_model_values, preset_overrides
from megatron_refine.models.config import FastWeightConfig

MODEL_TYPE = "gated_deltanet"
DESCRIPTION = "fla's Gated DeltaNet"
BASE_PRESET = "gated_deltanet_1p3b"  # imports are written as this preset plus the fields that differ

# fla GatedDeltaNetConfig fields whose value our mixer cannot reproduce: (field, allowed values (the first is fla's
# default, for a config.json without the field), why).
UNSUPPORTED = (
    ("use_gate", (True,), "no output gate (o_norm without g_proj)"),
    ("use_short_conv", (True,), "no short convolutions"),
    ("allow_neg_eigval", (False,), "negative eigenvalues (beta = 2 sigmoid(b))"),
    ("output_gate_activation", ("swish", "silu"), "an output gate activation other than SiLU"),
    ("conv_bias", (None, False), "short-convolution biases"),
    ("attn", (None, {}), "hybrid softmax-attention layers"),
    ("attnres_block_size", (None,), "attention residuals (attnres)"),
    ("hidden_act", ("swish", "silu"), "an MLP activation other than SiLU"),
)


def mixer_pieces(cfg: FastWeightConfig) -> list[tuple[str, int]]:
    """fla's projections fused in Megatron's in_proj, in order: (fla name, rows)."""
    qk = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    v, heads = cfg.linear_num_value_heads * cfg.linear_value_head_dim, cfg.linear_num_value_heads
    return [("q_proj", qk), ("k_proj", qk), ("v_proj", v), ("g_proj", v), ("b_proj", heads), ("a_proj", heads)]


def conv_pieces(cfg: FastWeightConfig) -> list[tuple[str, int]]:
    return mixer_pieces(cfg)[:3]


def _conv_name(proj: str) -> str:
    return proj.replace("_proj", "_conv1d")


# Per-layer tensors besides the fused ones: (Megatron name under the layer, fla name under the layer)
PLAIN = (("input_layernorm.weight", "attn_norm.weight"), ("self_attention.A_log", "attn.A_log"),
         ("self_attention.dt_bias", "attn.dt_bias"), ("self_attention.out_norm.weight", "attn.o_norm.weight"),
         ("self_attention.out_proj.weight", "attn.o_proj.weight"), ("pre_mlp_layernorm.weight", "mlp_norm.weight"),
         ("mlp.linear_fc2.weight", "mlp.down_proj.weight"))


def layer_to_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's fla tensors; `get(megatron name)` returns a whole Megatron tensor."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {f"{h}{hf}": get(f"{m}{ours}") for ours, hf in PLAIN}
    rows = get(f"{m}self_attention.in_proj.weight").split([n for _, n in mixer_pieces(cfg)])
    out.update({f"{h}attn.{name}.weight": w for (name, _), w in zip(mixer_pieces(cfg), rows)})
    conv = get(f"{m}self_attention.conv1d.weight").split([n for _, n in conv_pieces(cfg)])  # each [C, 1, W]
    out.update({f"{h}attn.{_conv_name(name)}.weight": w for (name, _), w in zip(conv_pieces(cfg), conv)})
    gate, up = get(f"{m}mlp.linear_fc1.weight").chunk(2)
    out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's Megatron tensors; `get(fla name)` returns a tensor of the HF checkpoint."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    out = {f"{m}{ours}": get(f"{h}{hf}") for ours, hf in PLAIN}
    out[f"{m}self_attention.in_proj.weight"] = torch.cat([get(f"{h}attn.{n}.weight") for n, _ in mixer_pieces(cfg)])
    out[f"{m}self_attention.conv1d.weight"] = torch.cat(
        [get(f"{h}attn.{_conv_name(n)}.weight") for n, _ in conv_pieces(cfg)])
    out[f"{m}mlp.linear_fc1.weight"] = torch.cat([get(f"{h}mlp.gate_proj.weight"), get(f"{h}mlp.up_proj.weight")])
    return out


def hf_names(cfg: FastWeightConfig) -> list[str]:
    """Every tensor name of the fla checkpoint (lm_head only when untied), for missing/unexpected checks."""
    layer = [hf for _, hf in PLAIN] + [f"attn.{n}.weight" for n, _ in mixer_pieces(cfg)]
    layer += [f"attn.{_conv_name(n)}.weight" for n, _ in conv_pieces(cfg)]
    layer += ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    names = ["model.embeddings.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    return names + [f"model.layers.{i}.{n}" for i in range(cfg.num_layers) for n in layer]


def hf_config(cfg: FastWeightConfig, vocab_size: int, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of fla's GatedDeltaNetConfig for a Megatron model config."""
    head_k, head_v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    expand_v = head_v / head_k
    if int(head_k * expand_v) != head_v:  # fla's value head dim is int(head_dim * expand_v): round up, not down
        expand_v = math.nextafter(expand_v, math.inf)
    return {
        "architectures": ["GatedDeltaNetForCausalLM"], "model_type": MODEL_TYPE, "attn_mode": "chunk",
        "hidden_size": cfg.hidden_size, "head_dim": head_k, "expand_v": expand_v,
        "num_heads": cfg.linear_num_key_heads, "num_v_heads": cfg.linear_num_value_heads, "use_gate": True,
        "output_gate_activation": "swish", "use_short_conv": True, "conv_size": cfg.linear_conv_kernel_dim,
        "allow_neg_eigval": False, **fla_model_config(cfg, vocab_size, token_ids, dtype),
    }


def megatron_model_args(config: dict) -> tuple[str, dict]:
    """(preset name, FastWeightConfig overrides) for an fla config.json; refuses what our mixer lacks."""
    check_supported(config, MODEL_TYPE, UNSUPPORTED, "fla's Gated DeltaNet")
    head_k = config.get("head_dim", 256)
    key_heads = config.get("num_heads", 6)
    value_heads = config.get("num_v_heads") or key_heads  # fla: None means as many as the key heads
    if value_heads % key_heads:
        raise ValueError(f"config.json has num_v_heads={value_heads}, not a multiple of num_heads={key_heads}: fla's "
                         "layer refuses it too, so the folder does not hold a Gated DeltaNet model")
    values = dict(
        mixer="gated_deltanet", **fla_model_values(config, num_layers=21), num_attention_heads=value_heads, linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
        linear_key_head_dim=head_k, linear_value_head_dim=int(head_k * config.get("expand_v", 2.0)),
        linear_conv_kernel_dim=config.get("conv_size", 4),
    )
    return BASE_PRESET, preset_overrides(BASE_PRESET, values)


def token_ids(config: dict) -> dict:
    return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
