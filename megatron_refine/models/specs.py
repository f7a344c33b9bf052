"""Megatron layer specs for the fast-weight stacks: a token mixer (models/mixers.py) + SwiGLU MLP, pre-RMSNorm.

Every layer has the config's `mixer`, or in a hybrid model the mixer its letter in `hybrid_layer_pattern` names.
Local megatron-core parallel linears by default, with our RMSNorm and PyTorch core attention; Transformer-Engine
modules (TEColumnParallelLinear, TERowParallelLinear, TENorm, TEDotProductAttention) when the runtime is on CUDA
and megatron-core's TE extension imports, unless `use_te=False`.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer, TransformerLayerSubmodules, get_transformer_layer_offset)

from megatron_refine.megatron_compat import mlp_submodule
from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.attention import TorchDotProductAttention
from megatron_refine.models.mixers import Backend, get_mixer
from megatron_refine.models.norm import RMSNorm
from megatron_refine.runtime import current_device


def te_available() -> bool:
    """Whether the TE spec can be built: a CUDA runtime (a CPU runtime on a GPU host keeps the local spec) and
    megatron-core's TE extension importable, which needs `transformer_engine.pytorch` (its fp8 module), not
    just the `transformer_engine` package (installed alone it is an empty shell without the PyTorch build)."""
    if current_device().type != "cuda":
        return False
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - a TE build that fails to load (CUDA / ABI mismatch) is "not available"
        return False
    return HAVE_TE


def backend(use_te: bool | None = None) -> Backend:
    """The modules of the chosen backend (TE where `te_available()`, unless use_te says otherwise)."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear, TEDotProductAttention, TENorm, TERowParallelLinear)

        return Backend(TEColumnParallelLinear, TERowParallelLinear, TENorm, TEDotProductAttention)
    return Backend(ColumnParallelLinear, RowParallelLinear, RMSNorm, TorchDotProductAttention)


def _layer_spec(mixer: ModuleSpec, modules: Backend) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=modules.norm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=modules.norm,
            mlp=mlp_submodule(MLPSubmodules(linear_fc1=modules.column, linear_fc2=modules.row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_layer_spec(mixer: str, use_te: bool | None = None) -> ModuleSpec:
    """One layer of the named mixer (see models/mixers.py) with the backend's linears and norms."""
    modules = backend(use_te)
    return _layer_spec(get_mixer(mixer).module_spec(modules), modules)


def get_block_spec(config: FastWeightConfig, use_te: bool | None = None, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds (megatron-core's split of the layers into stages), plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    specs = {name: get_layer_spec(name, use_te) for name in set(config.layer_mixers)}
    layers = [specs[name] for name in config.layer_mixers[offset:offset + num_layers]]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=backend(use_te).norm)
