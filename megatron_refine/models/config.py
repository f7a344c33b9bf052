"""`FastWeightConfig`: megatron-core's TransformerConfig plus the fields of every mixer in the table.

Each mixer declares its own fields (a dataclass beside the mixer, e.g. `deltanet.DeltaNetFields` in fla's
DeltaNetConfig names, `lact.LaCTFields` in the authors' lact_swiglu names) and its presets in its `MIXER` entry;
this config inherits them all, so a mixer's fields stay flat (`--set model.overrides.expand_k=2`, checkpoints'
`model_config`) and adding a mixer does not touch this file. Defaults follow ../shared/specs/architectures.md.
The Megatron fields a fast-weight LM needs are fixed here: RMSNorm (eps 1e-6), SwiGLU MLP, no biases, no
dropout, no Megatron position embedding (a mixer that needs positions applies its own RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_refine.models.common import fla_intermediate_size
from megatron_refine.models.mixers import MIXERS, get_mixer, mixer_for_symbol

_MIXER_FIELDS = tuple(get_mixer(name).config_fields for name in MIXERS)


@dataclass
class FastWeightConfig(*_MIXER_FIELDS, TransformerConfig):
    """A TransformerConfig whose token mixer is one of `MIXERS`, or a hybrid of them. `num_attention_heads` is the
    number of the mixer's heads (DeltaNet's heads, LaCT's sliding-window attention heads, attention's query heads;
    Gated DeltaNet has its own `linear_*` head counts)."""

    mixer: str = "deltanet"  # every layer's mixer; "hybrid" when hybrid_layer_pattern gives each layer's
    # One letter per layer (its mixer and its MLP), the mixers' `symbol`s: "G" Gated DeltaNet, "*" attention,
    # "N" DeltaNet, "L" LaCT; e.g. Qwen3.5's "GGG*" repeated. megatron-core's hybrid patterns give the MLP a letter
    # of its own ("G-G-G-*-"); here each layer has one. Pipeline stages split it as they split the layers.
    hybrid_layer_pattern: str | None = None

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
        if self.hybrid_layer_pattern:
            self.mixer = "hybrid"
            self._check_pattern()
        mixers = [get_mixer(name) for name in self.mixers]  # an unknown name first: the message lists the known ones
        heads = self.num_attention_heads
        if heads < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("num_layers, hidden_size and num_attention_heads must be set (>= 1)")
        if heads % tp != 0:
            raise ValueError(
                f"num_attention_heads ({heads}) must be divisible by tensor_model_parallel_size ({tp}): "
                f"use a TP size that divides {heads}, or change the head count"
            )
        for mixer in mixers:
            mixer.check_config(self)
            if self.context_parallel_size > 1 and mixer.context_parallel_refusal:
                raise ValueError(f"context_parallel_size={self.context_parallel_size} with {mixer.name} layers: "
                                 f"{mixer.context_parallel_refusal}. Use context_parallel_size=1 (README, Context "
                                 "parallelism)")
        super().__post_init__()

    def _check_pattern(self) -> None:
        pattern = self.hybrid_layer_pattern
        if "-" in pattern or "|" in pattern:
            raise ValueError(f"hybrid_layer_pattern {pattern!r}: each letter here is a whole layer (mixer and MLP), so "
                             "megatron-core's MLP letter '-' and stage separator '|' do not occur: write 'GGG*' for "
                             "its 'G-G-G-*-'; pipeline stages split the layers as for any model")
        for symbol in set(pattern):
            mixer_for_symbol(symbol)
        if len(pattern) != self.num_layers:
            raise ValueError(f"hybrid_layer_pattern has {len(pattern)} layers, num_layers is {self.num_layers}: give "
                             "one letter per layer")

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """Each layer's mixer name, in order."""
        if self.hybrid_layer_pattern:
            return tuple(mixer_for_symbol(symbol) for symbol in self.hybrid_layer_pattern)
        return (self.mixer,) * self.num_layers

    @property
    def architecture(self) -> str:
        """The mixer, or "hybrid" and its pattern: how logs and checkpoints name the model's layers."""
        return f"hybrid {self.hybrid_layer_pattern}" if self.hybrid_layer_pattern else self.mixer

    @property
    def mixers(self) -> tuple[str, ...]:
        """The distinct mixers of the model, in the order they first occur."""
        return tuple(dict.fromkeys(self.layer_mixers))

    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Published models (architectures.md) and tiny CPU ones, from each mixer's table entry: name -> field overrides.
PRESETS: dict[str, dict] = {name: preset for mixer in MIXERS for name, preset in get_mixer(mixer).presets.items()}
PUBLISHED_VOCAB_SIZE = 32000


def get_config(name: str, **overrides) -> FastWeightConfig:
    """A preset by name, with field overrides (e.g. tensor_model_parallel_size=2)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model config {name!r}; available: {', '.join(PRESETS)}")
    known = {f.name for f in fields(FastWeightConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; see megatron_refine.models.FastWeightConfig")
    values = {**PRESETS[name], **overrides}
    if values.get("hybrid_layer_pattern") and overrides.get("mixer", "hybrid") != "hybrid":
        raise ValueError(f"{name} is a hybrid: its layers' mixers come from hybrid_layer_pattern "
                         f"({values['hybrid_layer_pattern']!r}), not mixer={overrides['mixer']!r}; pass "
                         "hybrid_layer_pattern=None too for a model of one mixer")
    return FastWeightConfig(**values)


__all__ = ["FastWeightConfig", "PRESETS", "PUBLISHED_VOCAB_SIZE", "fla_intermediate_size", "get_config"]
