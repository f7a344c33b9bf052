"""`FastWeightConfig`: megatron-core's TransformerConfig plus the DeltaNet and LaCT mixer fields.

Defaults follow ../shared/specs/architectures.md (fla's DeltaNet, the authors' `lact_swiglu`). The
Megatron fields a fast-weight LM needs are fixed here too: RMSNorm (eps 1e-6), SwiGLU MLP, no biases, no
dropout, no Megatron position embedding (LaCT applies its own RoPE inside the mixer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_refine.models.mixers import get_mixer


def fla_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """fla's default MLP width: 256 * ceil(int(h * hidden_ratio * 2/3) / 256)."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


@dataclass
class FastWeightConfig(TransformerConfig):
    """A TransformerConfig whose token mixer is DeltaNet or LaCT. `num_attention_heads` is the number of
    DeltaNet heads, or of LaCT's sliding-window attention heads."""

    mixer: str = "deltanet"

    # DeltaNet (fla DeltaNetConfig names)
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_short_conv: bool = True
    conv_size: int = 4
    use_beta: bool = True
    qk_norm: str = "l2"
    qk_activation: str = "silu"
    use_output_norm: bool = True
    use_gate: bool = False
    allow_neg_eigval: bool = False
    delta_rule_chunk_size: int = 64

    # LaCT (the authors' lact_swiglu names)
    num_lact_heads: int = 4
    lact_chunk_size: int = 2048
    window_size: int = 2048
    inter_multi: float = 1.0
    w0_w2_low_rank: int = 32  # <= 0: full-rank w0 and w2
    use_momentum: bool = True
    use_muon: bool = True
    rope_theta: float = 1e6
    learnable_ttt_scale: bool = True
    qkv_silu: bool = True
    no_v_silu: bool = False  # with qkv_silu: SiLU on the fast path's q and k only (the authors' fused-kernel json)
    ttt_nope: bool = False
    lact_base_lr: float = 1e-3
    fw_init_gain: float = 0.5
    # Two epsilons of the authors' code that their config.json has no field for (named here in its style):
    # ttt_norm is fla's RMSNorm at its default eps 1e-5 (not norm_eps), and q, k of the fast path are
    # L2-normalised as x / (||x|| + 1e-5) ("lact"), not fla's x * rsqrt(||x||^2 + 1e-6) ("fla").
    ttt_norm_eps: float = 1e-5
    ttt_l2_norm: str = "lact"

    # Megatron fields with the fast-weight models' values.
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    gated_linear_unit: bool = True
    activation_func: callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    bias_activation_fusion: bool = False
    masked_softmax_fusion: bool = False
    apply_rope_fusion: bool = False
    persist_layer_norm: bool = False
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # The tokenizer's padding id (a Hugging Face model's pad_token_id): its embedding row gets no gradient from
    # lookups, as nn.Embedding(padding_idx=...) in fla's and the LaCT authors' models. None: no such token.
    pad_token_id: int | None = None
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = fla_intermediate_size(self.hidden_size)
        if self.pipeline_model_parallel_size > 1 and self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype  # the dtype of activations sent between stages
        tp = self.tensor_model_parallel_size
        mixer = get_mixer(self.mixer)  # an unknown name first: the message lists the known ones
        heads = self.num_attention_heads
        if heads < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("num_layers, hidden_size and num_attention_heads must be set (>= 1)")
        if heads % tp != 0:
            raise ValueError(
                f"num_attention_heads ({heads}) must be divisible by tensor_model_parallel_size ({tp}): "
                f"use a TP size that divides {heads}, or change the head count"
            )
        mixer.check_config(self)
        super().__post_init__()

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)

    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def lact_head_dim(self) -> int:
        return self.hidden_size // self.num_lact_heads


# LaCT-760M's mixer settings (the authors' lact_swiglu config), which their 3B layout shares.
_LACT = dict(mixer="lact", num_attention_heads=24, num_lact_heads=4, lact_chunk_size=2048, window_size=2048,
             w0_w2_low_rank=32, use_momentum=True, use_muon=True, rope_theta=1e6)

# Published models (architectures.md) and tiny CPU ones. Values are overrides of FastWeightConfig.
PRESETS: dict[str, dict] = {
    # fla-hub/delta_net-1.3B-100B
    "deltanet_1p3b": dict(
        mixer="deltanet", num_layers=24, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=fla_intermediate_size(2048),
    ),
    # LaCT-760M (lact_swiglu)
    "lact_760m": dict(**_LACT, num_layers=24, hidden_size=1536, ffn_hidden_size=fla_intermediate_size(1536)),
    # Past 1.3B (recipes/, docs/scaling.md): our layouts in the 1.3B's proportions (head dim 128, fla's MLP width);
    # no DeltaNet checkpoints of these sizes are published.
    "deltanet_2p7b": dict(
        mixer="deltanet", num_layers=32, hidden_size=2560, num_attention_heads=20,
        ffn_hidden_size=fla_intermediate_size(2560),
    ),
    "deltanet_7b": dict(
        mixer="deltanet", num_layers=32, hidden_size=4096, num_attention_heads=32,
        ffn_hidden_size=fla_intermediate_size(4096),
    ),
    # LaCT's 3B layout as the authors publish it (hidden 3072, 24 layers, 4 fast-weight heads), the rest as lact_760m
    "lact_3b": dict(**_LACT, num_layers=24, hidden_size=3072, ffn_hidden_size=fla_intermediate_size(3072)),
    "deltanet_tiny": dict(
        mixer="deltanet", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        delta_rule_chunk_size=16,
    ),
    "lact_tiny": dict(
        mixer="lact", num_layers=2, hidden_size=64, num_attention_heads=4, num_lact_heads=2,
        ffn_hidden_size=128, lact_chunk_size=16, window_size=12, w0_w2_low_rank=4,
    ),
}
PUBLISHED_VOCAB_SIZE = 32000


def get_config(name: str, **overrides) -> FastWeightConfig:
    """A preset by name, with field overrides (e.g. tensor_model_parallel_size=2)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; available: {', '.join(PRESETS)}")
    known = {f.name for f in fields(FastWeightConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; see megatron_refine.models.FastWeightConfig")
    return FastWeightConfig(**{**PRESETS[name], **overrides})


__all__ = ["FastWeightConfig", "PRESETS", "PUBLISHED_VOCAB_SIZE", "fla_intermediate_size", "get_config"]
