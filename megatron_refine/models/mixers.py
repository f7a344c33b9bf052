"""The table of token mixers: everything the rest of the code needs to know about a mixer, by its name.

As torchtitan's train-spec registry: each mixer's module defines its `MIXER = MixerSpec(...)` beside the mixer
(`deltanet.py`, `lact.py`), and `MIXER_MODULES` below lists those modules. Nothing else branches on a mixer's name:
the config's fields and presets, the layer spec, the config checks, the estimator and the Hugging Face converter
all ask `get_mixer(name)`. Adding a mixer: its module (the `MegatronModule`, its fields dataclass and presets, its
`MIXER` entry), its HF mapping in `conversion/` (optional), and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the mixer modules import the config, which checks itself through this table
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_refine.models.config import FastWeightConfig

MIXER_MODULES = {"deltanet": "megatron_refine.models.deltanet", "lact": "megatron_refine.models.lact",
                 "gated_deltanet": "megatron_refine.models.gated_deltanet",
                 "attention": "megatron_refine.models.self_attention"}
MIXERS = tuple(MIXER_MODULES)


@dataclass(frozen=True)
class Backend:
    """The modules a layer spec is built from: megatron-core's local ones on a CPU, Transformer Engine's on CUDA."""

    column: type  # column-parallel linear
    row: type  # row-parallel linear
    norm: type  # RMSNorm of the residual stream (and of attention's queries and keys)
    core_attention: type  # softmax attention over [s, b, heads, dim]


@dataclass(frozen=True)
class MixerSpec:
    name: str
    symbol: str  # its letter in a hybrid model's `hybrid_layer_pattern` (megatron-core's where it has one)
    module_spec: Callable[[Backend], ModuleSpec]  # the backend's modules (local or TE) -> the mixer's ModuleSpec
    check_config: Callable[[FastWeightConfig], None]  # raises ValueError naming the fix
    parameter_count: Callable[[FastWeightConfig], int]  # one layer's mixer at TP=1
    activation_bytes: Callable[[FastWeightConfig], float]  # what a layer's mixer keeps for its backward, per token
    branch_bytes: Callable[[FastWeightConfig], float]  # what REFINE's branch states add to that, per token
    state_values: Callable[[FastWeightConfig], int]  # the fast-weight values of one row of a layer's decoding state
    hf_module: str | None  # the module of megatron_refine.conversion that maps it to a Hugging Face format
    # A dataclass of the mixer's own fields (defaults included), which FastWeightConfig inherits; their names are
    # the reference implementation's, and must not clash with another mixer's or TransformerConfig's.
    config_fields: type
    presets: Mapping[str, dict]  # model presets (get_config's names) -> FastWeightConfig field values
    # Checkpoints without a record of the parameter order (before it was saved) hold another order than the
    # current one: their distributed-optimizer state cannot resume.
    parameter_order_changed: bool = False
    uses_muon: Callable[[FastWeightConfig], bool] = lambda config: False  # fast-weight updates with Newton-Schulz
    fla_layer: str | None = None  # the fla layer it reproduces: the parity tests' and benchmarks' reference
    # What a row's decoding state grows by per token of context (attention's keys and values); 0 for a fixed state.
    cache_values: Callable[[FastWeightConfig], int] = lambda config: 0
    # (config, context, k) -> bytes one REFINE branch row's scoring forward over k tokens keeps for its backward that
    # grow with the prefix it reads (attention's probabilities over it); 0 for a fixed state (`state_values` counts).
    branch_row_bytes: Callable[[FastWeightConfig, int, int], float] = lambda config, context, k: 0.0
    # Why it cannot run split over a context-parallel group (README, Context parallelism); None: it can.
    context_parallel_refusal: str | None = None
    # A (gated) delta-rule mixer's kernel heads (H, K, V) at TP=1, which its context-parallel state passing scales
    # with (the estimator's); None: not a delta rule.
    state_heads: Callable[[FastWeightConfig], tuple[int, int, int]] | None = None
    # (channels at TP=1, kernel width) of the short causal convolution on the mixer's inputs, whose window a
    # context-parallel piece reads from the previous piece (the estimator's); None: the layer has none.
    short_conv: Callable[[FastWeightConfig], tuple[int, int] | None] = lambda config: None


def get_mixer(name: str) -> MixerSpec:
    """The table's entry for a mixer name (FastWeightConfig.mixer)."""
    if name not in MIXER_MODULES:
        raise ValueError(f"mixer must be one of {MIXERS}, got {name!r} (megatron_refine/models/mixers.py lists them; a "
                         "hybrid model sets hybrid_layer_pattern, one mixer letter per layer)")
    return importlib.import_module(MIXER_MODULES[name]).MIXER


def mixer_for_symbol(symbol: str) -> str:
    """The mixer a `hybrid_layer_pattern` letter stands for."""
    for name in MIXERS:
        if get_mixer(name).symbol == symbol:
            return name
    known = ", ".join(f"{get_mixer(name).symbol!r} {name}" for name in MIXERS)
    raise ValueError(f"unknown layer symbol {symbol!r} in hybrid_layer_pattern: each letter is one layer (its mixer and "
                     f"MLP): {known}")


__all__ = ["Backend", "MIXERS", "MIXER_MODULES", "MixerSpec", "get_mixer", "mixer_for_symbol"]
