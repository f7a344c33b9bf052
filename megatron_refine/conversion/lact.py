"""LaCT <-> the authors' `lact_swiglu` Hugging Face format: config fields and tensor names
(../shared/specs/architectures.md), plus this project's modeling code shipped in every export (`lact_hf/`).

Megatron fuses the authors' projections of the hidden state: `in_proj` = cat[qkv | lr_proj | momentum_proj |
ttt_scale_proj] along dim 0 and `rate_bias` = cat of the last three's biases (models/lact.py: input_projections);
split, they and the layer's other tensors go by the authors' names (`qkv` = cat[q | k | v], `lr_proj`, `qk_scale`,
`w0.w_left`, ...), but for `momentum_proj.0` (their nn.Sequential with the sigmoid) and the block around the mixer
(`input_layernorm` / `attn_norm`, `out_proj` / `o_proj`, `linear_fc1` = cat[gate | up]).
The mapping works on whole (TP=1) tensors: the checkpoint code reshards before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_refine.conversion.common import check_supported, pad_token_id, preset_overrides
from megatron_refine.models.config import FastWeightConfig, fla_intermediate_size
from megatron_refine.models.lact import input_projections

MODEL_TYPE = "lact_swiglu"
DESCRIPTION = "the LaCT authors' model"
BASE_PRESET = "lact_760m"  # imports are written as this preset plus the fields that differ
REMOTE_CODE = Path(__file__).parent / "lact_hf"
REMOTE_FILES = ("configuration_lact_swiglu.py", "modeling_lact_swiglu.py")
AUTO_MAP = {
    "AutoConfig": "configuration_lact_swiglu.LaCTSWIGLUConfig",
    "AutoModel": "modeling_lact_swiglu.LaCTModel",
    "AutoModelForCausalLM": "modeling_lact_swiglu.LaCTForCausalLM",
}
AUTHORS_BASE_LR = 1e-3  # hard-coded in the authors' layer

# Authors' config fields our mixer cannot reproduce: (field, allowed values (the first is the authors' class
# default, for a config.json without the field), what the option is).
UNSUPPORTED = (
    ("attn_qk_norm", (False,), "RMSNorm on the attention q and k"),
    ("qkv_bias", (False,), "a bias on the qkv projection"),
    ("lr_dim", (1,), "more than one learning rate per fast-weight head and weight"),
    ("lr_parameterization", ("mamba",), "a learning-rate parameterisation other than softplus (mamba)"),
    ("ttt_prenorm", (False,), "pre-norm test-time training"),
    ("ttt_loss_type", ("dot_product",), "a fast-weight loss other than the negative dot product"),
    ("hidden_act", ("swish", "silu"), "an MLP activation other than SiLU"),
    ("elementwise_affine", (True, None), "norms without a learned weight"),
)


def _attn_pieces(cfg: FastWeightConfig) -> list[tuple[str, str]]:
    """(Megatron name under self_attention., authors' name under attn.) of the mixer's tensors; in_proj's and
    rate_bias's pieces by their projection's tensor's name (`_fused`)."""
    pieces = [("qkv.weight", "qkv.weight"), ("lr_proj.weight", "lr_proj.weight"), ("lr_proj.bias", "lr_proj.bias"),
              ("qk_scale", "qk_scale"), ("qk_offset", "qk_offset"), ("w1", "w1"),
              ("ttt_norm.weight", "ttt_norm.weight"), ("out_proj.weight", "o_proj.weight")]
    for w in ("w0", "w2"):
        pieces += [(f"{w}.w_left", f"{w}.w_left"), (f"{w}.w_right", f"{w}.w_right")] if cfg.w0_w2_low_rank > 0 \
            else [(w, w)]
    if cfg.use_momentum:
        pieces += [("momentum_proj.weight", "momentum_proj.0.weight"), ("momentum_proj.bias", "momentum_proj.0.bias")]
    if cfg.learnable_ttt_scale:
        pieces += [("ttt_scale_proj.weight", "ttt_scale_proj.weight"), ("ttt_scale_proj.bias", "ttt_scale_proj.bias")]
    return pieces


def _fused(cfg: FastWeightConfig) -> dict[str, list[tuple[str, int]]]:
    """{fused Megatron tensor: its pieces (projection's tensor, rows) in order} (models/lact.py)."""
    projections = input_projections(cfg)
    return {"in_proj.weight": [(f"{name}.weight", rows) for name, rows in projections],
            "rate_bias": [(f"{name}.bias", rows) for name, rows in projections[1:]]}


def layer_to_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's authors' tensors; `get(megatron name)` returns a whole Megatron tensor."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    unfused = {}
    for fused, pieces in _fused(cfg).items():
        rows = get(f"{m}self_attention.{fused}").split([n for _, n in pieces])
        unfused.update(zip((name for name, _ in pieces), rows))
    out = {f"{h}attn_norm.weight": get(f"{m}input_layernorm.weight")}
    out.update({f"{h}attn.{ours}": unfused.pop(mine) if mine in unfused else get(f"{m}self_attention.{mine}")
                for mine, ours in _attn_pieces(cfg)})
    out[f"{h}mlp_norm.weight"] = get(f"{m}pre_mlp_layernorm.weight")
    out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = get(f"{m}mlp.linear_fc1.weight").chunk(2)
    out[f"{h}mlp.down_proj.weight"] = get(f"{m}mlp.linear_fc2.weight")
    return {k: v.contiguous() for k, v in out.items()}


def layer_from_hf(cfg: FastWeightConfig, i: int, get) -> dict[str, torch.Tensor]:
    """Layer i's Megatron tensors; `get(authors' name)` returns a tensor of the HF checkpoint."""
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    attn = {mine: get(f"{h}attn.{ours}") for mine, ours in _attn_pieces(cfg)}
    fused = {name: torch.cat([attn.pop(piece) for piece, _ in pieces]) for name, pieces in _fused(cfg).items()}
    out = {f"{m}input_layernorm.weight": get(f"{h}attn_norm.weight")}
    out.update({f"{m}self_attention.{mine}": t for mine, t in (fused | attn).items()})
    out[f"{m}pre_mlp_layernorm.weight"] = get(f"{h}mlp_norm.weight")
    out[f"{m}mlp.linear_fc1.weight"] = torch.cat([get(f"{h}mlp.gate_proj.weight"), get(f"{h}mlp.up_proj.weight")])
    out[f"{m}mlp.linear_fc2.weight"] = get(f"{h}mlp.down_proj.weight")
    return out


def hf_names(cfg: FastWeightConfig) -> list[str]:
    """Every tensor name of the authors' checkpoint (lm_head only when untied)."""
    layer = ["attn_norm.weight", *(f"attn.{ours}" for _, ours in _attn_pieces(cfg)), "mlp_norm.weight",
             "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    names = ["model.embeddings.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    return names + [f"model.layers.{i}.{n}" for i in range(cfg.num_layers) for n in layer]


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def hf_config(cfg: FastWeightConfig, vocab_size: int, token_ids: dict, dtype: torch.dtype) -> dict:
    """config.json of the authors' LaCTSWIGLUConfig (every field, so their class defaults never apply), plus
    the two epsilon conventions their code fixes (`ttt_norm_eps`, `ttt_l2_norm`, read by our modeling code) and
    `auto_map` to the modeling code shipped beside it."""
    if cfg.lact_base_lr != AUTHORS_BASE_LR:
        raise ValueError(f"lact_base_lr={cfg.lact_base_lr} has no lact_swiglu equivalent (the authors' layer fixes "
                         f"the base learning rate at {AUTHORS_BASE_LR}): only models with that value export")
    return {
        "architectures": ["LaCTForCausalLM"], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attn_heads": cfg.num_attention_heads, "num_lact_heads": cfg.num_lact_heads,
        "inter_multi": _number(cfg.inter_multi), "qkv_bias": False, "attn_qk_norm": False,
        "lact_chunk_size": cfg.lact_chunk_size, "use_muon": cfg.use_muon, "lr_dim": 1, "qkv_silu": cfg.qkv_silu,
        "no_v_silu": cfg.no_v_silu, "lr_parameterization": "mamba", "learnable_ttt_scale": cfg.learnable_ttt_scale,
        "use_momentum": cfg.use_momentum, "ttt_loss_type": "dot_product", "ttt_prenorm": False,
        "ttt_nope": cfg.ttt_nope, "w0_w2_low_rank": cfg.w0_w2_low_rank if cfg.w0_w2_low_rank > 0 else -1,
        "window_size": cfg.window_size, "rope_theta": _number(cfg.rope_theta),
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_ratio": 4,
        "intermediate_size": cfg.ffn_hidden_size, "hidden_act": "swish", "initializer_range": cfg.init_method_std,
        "elementwise_affine": True, "norm_eps": cfg.layernorm_epsilon, "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"), "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": token_ids.get("pad_token_id"), "tie_word_embeddings": cfg.tie_word_embeddings,
        "fuse_norm": True, "last_layer_fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
        "vocab_size": vocab_size, "fw_init_gain": cfg.fw_init_gain, "use_fused_kernel": False, "fp32_states": False,
        "ttt_norm_eps": cfg.ttt_norm_eps, "ttt_l2_norm": cfg.ttt_l2_norm,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def megatron_model_args(config: dict) -> tuple[str, dict]:
    """(preset name, FastWeightConfig overrides) for a lact_swiglu config.json; refuses what our mixer lacks.
    Missing fields take the authors' class defaults (not the published jsons' values: see the spec)."""
    check_supported(config, MODEL_TYPE, UNSUPPORTED, "the LaCT authors'")
    h = config.get("hidden_size", 2048)
    rank = config.get("w0_w2_low_rank", -1)
    values = dict(
        mixer="lact", num_layers=config.get("num_hidden_layers", 24), hidden_size=h,
        num_attention_heads=config.get("num_attn_heads", 32), num_lact_heads=config.get("num_lact_heads", 4),
        ffn_hidden_size=config.get("intermediate_size") or fla_intermediate_size(h, config.get("hidden_ratio") or 4),
        inter_multi=float(config.get("inter_multi", 1)), lact_chunk_size=config.get("lact_chunk_size", 2048),
        window_size=config.get("window_size", 2048), w0_w2_low_rank=rank if rank > 0 else -1,
        use_momentum=config.get("use_momentum", True), use_muon=config.get("use_muon", False),
        rope_theta=float(config.get("rope_theta") or 1e4), learnable_ttt_scale=config.get("learnable_ttt_scale", True),
        qkv_silu=config.get("qkv_silu", True), no_v_silu=config.get("no_v_silu", False),
        ttt_nope=config.get("ttt_nope", False),
        fw_init_gain=config.get("fw_init_gain", 0.5), lact_base_lr=AUTHORS_BASE_LR,
        ttt_norm_eps=config.get("ttt_norm_eps", 1e-5), ttt_l2_norm=config.get("ttt_l2_norm", "lact"),
        layernorm_epsilon=config.get("norm_eps", 1e-6),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False), pad_token_id=pad_token_id(config, 32000),
    )
    return BASE_PRESET, preset_overrides(BASE_PRESET, values)


def token_ids(config: dict) -> dict:
    """The special ids, with the authors' class defaults (bos 1, eos 2) for a config.json without them."""
    defaults = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    return {k: config.get(k, v) for k, v in defaults.items()}
