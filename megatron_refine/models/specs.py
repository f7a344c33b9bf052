"""Megatron layer specs for the fast-weight stacks: a token mixer (models/mixers.py) + SwiGLU MLP, pre-RMSNorm.

Local megatron-core parallel linears by default; Transformer-Engine modules (TEColumnParallelLinear,
TERowParallelLinear, TENorm) when the runtime is on CUDA and megatron-core's TE extension imports, unless
`use_te=False`.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_refine.megatron_compat import mlp_submodule
from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.mixers import get_mixer
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


def _modules(use_te: bool | None):
    """(column-parallel linear, row-parallel linear, norm) for the chosen backend."""
    if use_te is None:
        use_te = te_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm, TERowParallelLinear

        return TEColumnParallelLinear, TERowParallelLinear, TENorm
    return ColumnParallelLinear, RowParallelLinear, RMSNorm


def _layer_spec(mixer: ModuleSpec, column, row, norm) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_submodule(MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_layer_spec(mixer: str, use_te: bool | None = None) -> ModuleSpec:
    """One layer of the named mixer (see models/mixers.py) with the backend's linears and norms."""
    column, row, norm = _modules(use_te)
    return _layer_spec(get_mixer(mixer).module_spec(column, row), column, row, norm)


def get_block_spec(config: FastWeightConfig, use_te: bool | None = None, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, plus the final norm."""
    layer = get_layer_spec(config.mixer, use_te)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_modules(use_te)[2])
