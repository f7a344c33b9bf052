"""Qwen3.5 (text) <-> transformers' `qwen3_5_text` format (`Qwen3_5ForCausalLM`): config fields and tensor names.

A Qwen3.5 layer is a Gated DeltaNet layer (`layer_types` "linear_attention", our "G") or a gated attention layer
("full_attention", our "*"), each with a SwiGLU MLP; `hybrid_layer_pattern` keeps that order. Both sides apply the
same math (transformers' modeling_qwen3_5.py):
- norms of the residual stream and q / k norms are zero-centered (scale by 1 + weight): our
  `layernorm_zero_centered_gamma`, the weights copied as they are; the Gated DeltaNet output norm is plain.
- Gated DeltaNet: in_proj_qkv = [q | k | v] (the conv1d channels in that order), in_proj_z, in_proj_b, in_proj_a
  are the pieces of our fused `in_proj` = cat[q | k | v | z | beta | alpha]; value head j reads key head
  j // (HV / HK) on both sides.
- Attention: q_proj holds each head's query and output gate side by side ([q_h | gate_h], D rows each);
  megatron-core's `linear_qkv` holds per query group [its heads' q | their gates | k | v]; RoPE rotates the first
  `partial_rotary_factor` of each head's dims in non-interleaved halves (`rotary_percent`). A text-only model's
  multimodal RoPE sections all see the same positions: plain RoPE.
A vision-language checkpoint (`qwen3_5`, `Qwen3_5ForConditionalGeneration`) converts its language model
(`text_config`, tensors `model.language_model.*`), as `Qwen3_5ForCausalLM.from_pretrained` reads it; exports are
text models. The mapping works on whole (TP=1) tensors: the checkpoint code reshards before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_refine.conversion.common import check_supported, pad_token_id, preset_overrides
from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.mixers import get_mixer
from megatron_refine.models.self_attention import head_dim, query_groups

MODEL_TYPE = "qwen3_5_text"
DESCRIPTION = "Qwen3.5's text model, also inside a vision-language 'qwen3_5' folder"
BASE_PRESET = "hybrid_tiny"  # imports are written as this preset plus the fields that differ
# The tensors outside the layers: Megatron name -> transformers' name.
OUTER_NAMES = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
               "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
# Other model_types of the family: the vision-language wrapper converts its language model; MoE ones are refused.
WRAPPER_TYPE = "qwen3_5"
REFUSED_TYPES = {"qwen3_5_moe": "Qwen3.5 MoE's mixture-of-experts MLPs",
                 "qwen3_5_moe_text": "Qwen3.5 MoE's mixture-of-experts MLPs"}
READS = (MODEL_TYPE, WRAPPER_TYPE, *REFUSED_TYPES)
# Tensors a checkpoint may hold that the text model does not use (Qwen3_5ForCausalLM skips them too).
SKIPPED = {"mtp.": "the multi-token-prediction head (mtp.*)"}
VISION = {"model.visual.": "the vision encoder (model.visual.*)"}

# Qwen3_5TextConfig fields whose value our model cannot reproduce: (field, allowed values (the first is
# transformers' default, for a config.json without the field), why).
UNSUPPORTED = (
    ("attention_bias", (False,), "biases on the attention projections"),
    ("attention_dropout", (0.0, 0), "attention dropout"),
    ("hidden_act", ("silu", "swish"), "an MLP / short-convolution activation other than SiLU"),
)


def handles(cfg: FastWeightConfig) -> bool:
    """Whether this format exports the model: its layers are Gated DeltaNet and attention layers only."""
    return set(cfg.layer_mixers) <= set(LAYERS)


def _gdn_sizes(cfg: FastWeightConfig) -> list[int]:
    """Rows of in_proj_qkv, in_proj_z, in_proj_b, in_proj_a: the pieces of Megatron's in_proj, in order."""
    qk = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    v, heads = cfg.linear_num_value_heads * cfg.linear_value_head_dim, cfg.linear_num_value_heads
    return [2 * qk + v, v, heads, heads]


def _qkv_to_hf(cfg: FastWeightConfig, w: torch.Tensor) -> list[torch.Tensor]:
    """linear_qkv [G (2 r D + 2 D), h] (r = heads per group) -> q_proj [heads 2 D, h], k_proj, v_proj [G D, h]."""
    G, D, h = query_groups(cfg), head_dim(cfg), w.shape[-1]
    r = cfg.num_attention_heads // G
    q, gate, k, v = w.view(G, -1, h).split([r * D, r * D, D, D], dim=1)  # [G, rD | rD | D | D, h]
    q_proj = torch.stack([q.reshape(-1, D, h), gate.reshape(-1, D, h)], dim=1)  # [heads, 2, D, h]: [q_h | gate_h]
    return [q_proj.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


def _qkv_from_hf(cfg: FastWeightConfig, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of `_qkv_to_hf`."""
    (q_proj, k_proj, v_proj), G, D = pieces, query_groups(cfg), head_dim(cfg)
    h = q_proj.shape[-1]
    q, gate = q_proj.view(G, -1, 2, D, h).unbind(2)  # [G, r, D, h] each
    parts = [q.reshape(G, -1, h), gate.reshape(G, -1, h), k_proj.view(G, D, h), v_proj.view(G, D, h)]
    return torch.cat(parts, dim=1).reshape(-1, h)  # [G (2 r D + 2 D), h]


@dataclass(frozen=True)
class Fused:
    """A Megatron tensor that holds several of transformers' (names under the layer)."""

    ours: str
    theirs: tuple[str, ...]
    split: Callable[[FastWeightConfig, torch.Tensor], list[torch.Tensor]]  # ours -> theirs, in order
    join: Callable[[FastWeightConfig, list[torch.Tensor]], torch.Tensor]  # theirs, in order -> ours


@dataclass(frozen=True)
class LayerKind:
    """How one of our mixers' layers maps: its config.json layer_types entry, the tensors copied as they are
    ((Megatron name, transformers' name) under the layer), the fused ones, and the config fields a Qwen3.5 layer of
    this kind always has ((field, what it is))."""

    layer_type: str
    plain: tuple[tuple[str, str], ...]
    fused: tuple[Fused, ...]
    required: tuple[tuple[str, str], ...] = ()


_cat = lambda cfg, pieces: torch.cat(pieces)  # noqa: E731
MLP = Fused("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            lambda cfg, w: list(w.chunk(2)), _cat)
COMMON = (("input_layernorm.weight", "input_layernorm.weight"),
          ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
          ("mlp.linear_fc2.weight", "mlp.down_proj.weight"))
LAYERS = {  # our mixer -> its layers' mapping
    "gated_deltanet": LayerKind("linear_attention", COMMON + (
        ("self_attention.A_log", "linear_attn.A_log"), ("self_attention.dt_bias", "linear_attn.dt_bias"),
        ("self_attention.conv1d.weight", "linear_attn.conv1d.weight"),  # [q | k | v] channels on both sides
        ("self_attention.out_norm.weight", "linear_attn.norm.weight"),
        ("self_attention.out_proj.weight", "linear_attn.out_proj.weight")), (
        MLP, Fused("self_attention.in_proj.weight",
                   tuple(f"linear_attn.in_proj_{n}.weight" for n in ("qkv", "z", "b", "a")),
                   lambda cfg, w: list(w.split(_gdn_sizes(cfg))), _cat))),
    "attention": LayerKind("full_attention", COMMON + (
        ("self_attention.q_layernorm.weight", "self_attn.q_norm.weight"),
        ("self_attention.k_layernorm.weight", "self_attn.k_norm.weight"),
        ("self_attention.linear_proj.weight", "self_attn.o_proj.weight")), (
        MLP, Fused("self_attention.linear_qkv.weight",
                   tuple(f"self_attn.{n}_proj.weight" for n in ("q", "k", "v")), _qkv_to_hf, _qkv_from_hf)),
        required=(("attention_output_gate", "an attention output gate"), ("qk_layernorm", "q / k norms"))),
}


def layer_to_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's transformers tensors; `get(megatron name)` returns a whole Megatron tensor."""
    m, h, kind = f"decoder.layers.{i}.", f"model.layers.{i}.", LAYERS[cfg.layer_mixers[i]]
    out = {f"{h}{hf}": get(f"{m}{ours}") for ours, hf in kind.plain}
    for fused in kind.fused:
        out.update({f"{h}{name}": w for name, w in zip(fused.theirs, fused.split(cfg, get(f"{m}{fused.ours}")))})
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's Megatron tensors; `get(transformers name)` returns a tensor of the HF checkpoint."""
    m, h, kind = f"decoder.layers.{i}.", f"model.layers.{i}.", LAYERS[cfg.layer_mixers[i]]
    out = {f"{m}{ours}": get(f"{h}{hf}") for ours, hf in kind.plain}
    for fused in kind.fused:
        out[f"{m}{fused.ours}"] = fused.join(cfg, [get(f"{h}{name}") for name in fused.theirs])
    return out


def hf_names(cfg: FastWeightConfig) -> list[str]:
    """Every tensor name of the transformers checkpoint (lm_head only when untied), for missing/unexpected checks."""
    names = [OUTER_NAMES["embedding.word_embeddings.weight"], OUTER_NAMES["decoder.final_layernorm.weight"]]
    names += [] if cfg.tie_word_embeddings else [OUTER_NAMES["output_layer.weight"]]
    for i, mixer in enumerate(cfg.layer_mixers):
        kind = LAYERS[mixer]
        layer = [hf for _, hf in kind.plain] + [name for fused in kind.fused for name in fused.theirs]
        names += [f"model.layers.{i}.{n}" for n in layer]
    return names


def hf_config(cfg: FastWeightConfig, vocab_size: int, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of transformers' Qwen3_5TextConfig for a Megatron model config; refuses what Qwen3.5 lacks."""
    needed = [("layernorm_zero_centered_gamma", "zero-centered norms")]
    needed += [field for mixer in cfg.mixers for field in LAYERS[mixer].required]
    lacking = [f"{why} ({field})" for field, why in needed if not getattr(cfg, field)]
    if lacking:
        raise ValueError(f"Qwen3.5 layers always have {', '.join(lacking)}, which this model lacks: only a model "
                         "configured as Qwen3.5 exports to qwen3_5_text")
    return {
        "architectures": ["Qwen3_5ForCausalLM"], "model_type": MODEL_TYPE, "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "layer_types": [LAYERS[mixer].layer_type for mixer in cfg.layer_mixers],
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": query_groups(cfg),
        "head_dim": head_dim(cfg), "attention_bias": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_percent},
        "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim, "linear_key_head_dim": cfg.linear_key_head_dim,
        "linear_value_head_dim": cfg.linear_value_head_dim, "linear_num_key_heads": cfg.linear_num_key_heads,
        "linear_num_value_heads": cfg.linear_num_value_heads, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.layernorm_epsilon, "tie_word_embeddings": cfg.tie_word_embeddings, "use_cache": True,
        **{k: token_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "dtype": str(dtype).removeprefix("torch."),
    }


def language_model(config: dict) -> tuple[dict, dict[str, str], dict[str, str], str | None]:
    """What of a checkpoint converts: (the text model's config.json, {checkpoint prefix: text model prefix} renames,
    {prefix: what} of tensors left out, a note for the user or None). A vision-language `qwen3_5` folder gives its
    `text_config` (special ids and tying of the whole model where the text config lacks them) and its
    `model.language_model.*` tensors."""
    if config.get("model_type") in REFUSED_TYPES:
        raise ValueError(f"config.json has model_type {config['model_type']!r} ({REFUSED_TYPES[config['model_type']]}),"
                         " which megatron-refine's models do not have: only dense Qwen3.5 checkpoints convert")
    if config.get("model_type") != WRAPPER_TYPE:
        return config, {}, SKIPPED, None
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise ValueError("config.json is a Qwen3.5 vision-language model (qwen3_5) without a text_config: not a "
                         "complete Qwen3.5 checkpoint")
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    text = {**ids, **text, "model_type": text.get("model_type", MODEL_TYPE)}
    if "tie_word_embeddings" in config:  # Qwen3_5ForConditionalGeneration ties by its own config's field
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    note = ("a Qwen3.5 vision-language checkpoint (qwen3_5): converting its language model only (config.json's "
            "text_config, tensors model.language_model.*); the import is a text model")
    return text, {"model.language_model.": "model."}, {**SKIPPED, **VISION}, note


def _layer_pattern(config: dict, layers: int) -> str:
    """hybrid_layer_pattern of config.json's layer_types (without them, transformers' full_attention_interval rule:
    every interval-th layer is attention)."""
    types = config.get("layer_types")
    if types is None:
        interval = config.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    symbols = {kind.layer_type: get_mixer(mixer).symbol for mixer, kind in LAYERS.items()}
    unknown = sorted(set(types) - set(symbols))
    if unknown:
        raise ValueError(f"config.json's layer_types has {unknown}: Qwen3.5 layers are {sorted(symbols)}")
    if len(types) != layers:
        raise ValueError(f"config.json has {len(types)} layer_types for num_hidden_layers={layers}: a broken config")
    return "".join(symbols[t] for t in types)


def _rope(config: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor), from rope_parameters (transformers 5) or the top-level fields of older
    configs; refuses scaled RoPE."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json sets rope_type={kind!r} (scaled RoPE), which megatron-refine does not "
                         "implement: only Qwen3.5 checkpoints with the default RoPE convert")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.25)))


def megatron_model_args(config: dict) -> tuple[str, dict]:
    """(preset name, FastWeightConfig overrides) for a qwen3_5_text config.json; refuses what our model lacks."""
    check_supported(config, MODEL_TYPE, UNSUPPORTED, "Qwen3.5's text model")
    layers, hidden = config.get("num_hidden_layers", 32), config.get("hidden_size", 4096)
    heads = config.get("num_attention_heads", 16)
    theta, partial = _rope(config)
    values = dict(
        hybrid_layer_pattern=_layer_pattern(config, layers), num_layers=layers, hidden_size=hidden,
        ffn_hidden_size=config.get("intermediate_size", 12288), num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads", 4), kv_channels=config.get("head_dim", 256),
        qk_layernorm=True, attention_output_gate=True, layernorm_zero_centered_gamma=True, rotary_base=theta,
        rotary_percent=partial, linear_conv_kernel_dim=config.get("linear_conv_kernel_dim", 4),
        linear_key_head_dim=config.get("linear_key_head_dim", 128),
        linear_value_head_dim=config.get("linear_value_head_dim", 128),
        linear_num_key_heads=config.get("linear_num_key_heads", 16),
        linear_num_value_heads=config.get("linear_num_value_heads", 32),
        layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 32768),
        init_method_std=config.get("initializer_range", 0.02),
        tie_word_embeddings=config.get("tie_word_embeddings", False), pad_token_id=pad_token_id(config, 248320),
    )
    return BASE_PRESET, preset_overrides(BASE_PRESET, values)


def token_ids(config: dict) -> dict:
    return {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
