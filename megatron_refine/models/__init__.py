"""DeltaNet, Gated DeltaNet, LaCT and attention (hybrid models' attention layers) as megatron-core layer specs, the
model builder, cached decoding and branch states."""

from megatron_refine.models.config import PRESETS, PUBLISHED_VOCAB_SIZE, FastWeightConfig, get_config
from megatron_refine.models.deltanet import DeltaNetCache, DeltaNetMixer, DeltaNetSubmodules
from megatron_refine.models.gated_deltanet import GatedDeltaNetMixer, GatedDeltaNetSubmodules
from megatron_refine.models.generation import generate, sample_tokens, sampling_logits
from megatron_refine.models.inference import BranchRequest, ContinueRequest, DecodeRequest, InferenceCache
from megatron_refine.models.lact import LaCTCache, LaCTMixer, LaCTSubmodules
from megatron_refine.models.mixers import MIXERS, MixerSpec, get_mixer
from megatron_refine.models.model import (
    BranchOutput,
    FastWeightGPTModel,
    build_model,
    frozen_copy,
    mask_padded_vocab,
    padded_vocab_size,
)
from megatron_refine.models.packing import Packing, packed_seq_params
from megatron_refine.models.self_attention import AttentionCache, AttentionMixer
from megatron_refine.models.specs import get_block_spec, get_layer_spec

__all__ = [
    "PRESETS",
    "PUBLISHED_VOCAB_SIZE",
    "AttentionCache",
    "AttentionMixer",
    "BranchOutput",
    "BranchRequest",
    "ContinueRequest",
    "DecodeRequest",
    "DeltaNetCache",
    "DeltaNetMixer",
    "DeltaNetSubmodules",
    "FastWeightConfig",
    "FastWeightGPTModel",
    "GatedDeltaNetMixer",
    "GatedDeltaNetSubmodules",
    "InferenceCache",
    "LaCTCache",
    "LaCTMixer",
    "LaCTSubmodules",
    "MIXERS",
    "MixerSpec",
    "Packing",
    "build_model",
    "frozen_copy",
    "generate",
    "get_block_spec",
    "get_config",
    "get_layer_spec",
    "get_mixer",
    "mask_padded_vocab",
    "packed_seq_params",
    "padded_vocab_size",
    "sample_tokens",
    "sampling_logits",
]
