"""Gated DeltaNet token mixer: megatron-core's `GatedDeltaNet` layer, parameter for parameter, plus what ours do.

The parameters, their names, shapes and TP sharding, and the sharded checkpoint keys are megatron-core's
(`megatron/core/ssm/gated_delta_net.py` in 0.16.1, `ssm/gated_delta_net/` in 0.19), so its distributed checkpoints
load here and back; its config fields are TransformerConfig's own `linear_*` fields. What megatron-core's layer
lacks (it raises): cached decoding, branch states, prefill, continuing from a cache, and packed documents in its
deterministic path. Its forward is reproduced (tests/models/test_gated_deltanet.py); one deliberate difference: the
decay is computed from A_log in fp32 (as fla), where megatron-core takes exp(A_log) in the parameter dtype.

Parallel layout (TP size t): key heads HK and value heads HV split across ranks. Value head j reads key head
j // (HV / HK) (q and k repeated with repeat_interleave, as megatron-core), so each rank's value heads read only its
own key heads.
    in_proj   column-parallel  h -> [q HK Dk | k HK Dk | v HV Dv | z HV Dv | beta HV | alpha HV], each piece /t
    conv1d    depthwise over this rank's q|k|v channels, then SiLU, no communication
    A_log, dt_bias  [HV/t]: the decay g = -exp(A_log) * softplus(alpha + dt_bias) (log space, fp32)
    out_norm  RMSNorm over the value head dim gated by silu(z): one weight shared by all heads (gradient
              all-reduced over TP)
    out_proj  row-parallel     HV Dv -> h
Under sequence parallelism the input is [s/t, b, h]: in_proj gathers the sequence, out_proj reduce-scatters it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.models.common import (
    fla_intermediate_size, l2_norm, mixer_sharded_state_dict, param_device, split_fused)
from megatron_refine.models.deltanet import project_inputs, run_delta_rule, short_conv
from megatron_refine.models.inference import BranchRequest, ContinueRequest, DecodeRequest, PrefillRequest
from megatron_refine.models.mixers import MixerSpec
from megatron_refine.models.norm import HeadRMSNorm

if TYPE_CHECKING:  # the config inherits GatedDeltaNetFields through the mixer table
    from megatron_refine.models.config import FastWeightConfig

A_INIT_RANGE = (1.0, 16.0)  # megatron-core's GatedDeltaNet default: A ~ U(1, 16), A_log = log A


@dataclass
class GatedDeltaNetFields:
    """None of its own: the layout is TransformerConfig's `linear_conv_kernel_dim`, `linear_key_head_dim`,
    `linear_value_head_dim`, `linear_num_key_heads` and `linear_num_value_heads` (megatron-core's names), the
    chunk size DeltaNet's `delta_rule_chunk_size`, the norm's eps `layernorm_epsilon`."""


@dataclass
class GatedDeltaNetSubmodules:
    in_proj: ModuleSpec | type = IdentityOp
    out_proj: ModuleSpec | type = IdentityOp


class GatedDeltaNetMixer(MegatronModule):
    """[s(/t), b, h] -> [s(/t), b, h]; its decoding cache is a `DeltaNetCache` (state [N, HV/t, Dk, Dv])."""

    def __init__(
        self,
        config: FastWeightConfig,
        submodules: GatedDeltaNetSubmodules,
        layer_number: int | None = None,
        **kwargs,
    ):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp = tp = parallel_state.get_tensor_model_parallel_world_size()
        c = config
        self.head_k_dim, self.head_v_dim = c.linear_key_head_dim, c.linear_value_head_dim
        self.num_k_heads, self.num_v_heads = c.linear_num_key_heads // tp, c.linear_num_value_heads // tp
        self.group = c.linear_num_value_heads // c.linear_num_key_heads  # value heads per key head
        qk_dim, v_dim = c.linear_num_key_heads * self.head_k_dim, c.linear_num_value_heads * self.head_v_dim
        # megatron-core's in_proj pieces and their checkpoint names, in its order.
        self.pieces = [("query", qk_dim), ("key", qk_dim), ("value", v_dim), ("z", v_dim),
                       ("beta", c.linear_num_value_heads), ("alpha", c.linear_num_value_heads)]
        self.qkv_sizes = [size // tp for _, size in self.pieces[:3]]
        self.conv_channels = sum(self.qkv_sizes)

        self.in_proj = build_module(
            submodules.in_proj, c.hidden_size, sum(size for _, size in self.pieces), config=c,
            init_method=c.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="fc1",
        )
        device, dtype = param_device(c), c.params_dtype
        self.conv1d = torch.nn.Conv1d(
            self.conv_channels, self.conv_channels, c.linear_conv_kernel_dim, groups=self.conv_channels,
            bias=False, device=device, dtype=dtype,
        )
        # dt_bias before A_log: megatron-core's registration order, so both list the parameters alike.
        self.dt_bias = torch.nn.Parameter(torch.empty(self.num_v_heads, device=device, dtype=dtype))
        self.A_log = torch.nn.Parameter(torch.empty(self.num_v_heads, device=device, dtype=dtype))
        for param in (self.conv1d.weight, self.dt_bias, self.A_log):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        if c.perform_initialization:
            with get_cuda_rng_tracker().fork():  # channels and heads differ per TP rank
                torch.nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))  # nn.Conv1d's own
                torch.nn.init.ones_(self.dt_bias)
                with torch.no_grad():
                    self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_INIT_RANGE).log())
        self.out_norm = HeadRMSNorm(c, self.head_v_dim, eps=c.layernorm_epsilon)
        self.out_proj = build_module(
            submodules.out_proj, v_dim, c.hidden_size, config=c,
            init_method=c.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2",
        )
        # The model sets it for one call (why not an argument: models/inference.py)
        self.request: BranchRequest | PrefillRequest | DecodeRequest | ContinueRequest | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """[s(/t), b, h] -> ([s(/t), b, h], bias). In decoding the rows are the sequence dim: [N(/t), 1, h].

        `packed_seq_params` (document starts, see models/packing.py) restarts the state and the short
        convolution at every document.
        """
        x, packing, cache = project_inputs(self, hidden_states, packed_seq_params)  # [B, T, in/t]
        B, T = x.shape[:2]
        qkv, z, beta, alpha = x.split([self.conv_channels, self.num_v_heads * self.head_v_dim,
                                       self.num_v_heads, self.num_v_heads], dim=-1)
        qkv, conv_tail, conv_inputs = short_conv(self.conv1d, qkv, packing, cache)
        q, k, v = F.silu(qkv).split(self.qkv_sizes, dim=-1)
        q = l2_norm(q.reshape(B, T, self.num_k_heads, self.head_k_dim))
        k = l2_norm(k.reshape(B, T, self.num_k_heads, self.head_k_dim))
        if self.group > 1:
            q, k = q.repeat_interleave(self.group, dim=2), k.repeat_interleave(self.group, dim=2)  # [B, T, HV/t, Dk]
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        acc = compute_dtype(alpha)
        g = -self.A_log.to(acc).exp() * F.softplus(alpha.to(acc) + self.dt_bias.to(acc))  # [B, T, HV/t], <= 0
        beta = beta.sigmoid()

        o = run_delta_rule(self, q, k, v, g, beta, cache, conv_tail, conv_inputs, packing,
                           self.config.linear_conv_kernel_dim)  # [B, T, HV/t, Dv]
        o = self.out_norm(o, z.reshape(B, T, self.num_v_heads, self.head_v_dim)).reshape(B, T, -1)
        o = o if isinstance(self.request, DecodeRequest) else o.transpose(0, 1)
        return self.out_proj(o.contiguous())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron-core GatedDeltaNet's keys: A_log, dt_bias, in_proj.weight.{query,key,value,z,beta,alpha},
        conv1d.weight.{query,key,value}, out_norm.weight, out_proj.weight, each piece sharded over TP on its own."""
        state = mixer_sharded_state_dict(
            self, prefix, sharded_offsets, metadata, {"A_log": 0, "dt_bias": 0}, {"conv1d": {"weight": 0}})
        split_fused(state, f"{prefix}in_proj.weight", self.pieces, self.tp)
        split_fused(state, f"{prefix}conv1d.weight", self.pieces[:3], self.tp)
        return state


def check_gated_deltanet_config(config: FastWeightConfig) -> None:
    c = config
    layout = dict(linear_conv_kernel_dim=c.linear_conv_kernel_dim, linear_key_head_dim=c.linear_key_head_dim,
                  linear_value_head_dim=c.linear_value_head_dim, linear_num_key_heads=c.linear_num_key_heads,
                  linear_num_value_heads=c.linear_num_value_heads)
    unset = [name for name, value in layout.items() if value is None or value < 1]
    if unset:
        raise ValueError(f"Gated DeltaNet needs {', '.join(unset)} set (>= 1)")
    if c.linear_num_value_heads % c.linear_num_key_heads != 0:
        raise ValueError(
            f"linear_num_value_heads ({c.linear_num_value_heads}) must be a multiple of linear_num_key_heads "
            f"({c.linear_num_key_heads})"
        )
    tp = c.tensor_model_parallel_size
    if c.linear_num_key_heads % tp != 0:
        raise ValueError(
            f"linear_num_key_heads ({c.linear_num_key_heads}) must be divisible by tensor_model_parallel_size "
            f"({tp}): use a TP size that divides {c.linear_num_key_heads}"
        )


def _dims(config: FastWeightConfig) -> tuple[int, int, int]:
    """(q / k width HK Dk, v width HV Dv, value heads HV) of one layer at TP=1."""
    c = config
    return (c.linear_num_key_heads * c.linear_key_head_dim, c.linear_num_value_heads * c.linear_value_head_dim,
            c.linear_num_value_heads)


def gated_deltanet_parameter_count(config: FastWeightConfig) -> int:
    qk, v, heads = _dims(config)
    h = config.hidden_size
    in_proj = h * (2 * qk + 2 * v + 2 * heads)
    return in_proj + (2 * qk + v) * config.linear_conv_kernel_dim + 2 * heads + config.linear_value_head_dim + v * h


def gated_deltanet_state_values(config: FastWeightConfig) -> int:
    """A layer's fast-weight state: HV x Dk x Dv values."""
    return config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim


def gated_deltanet_activation_bytes(config: FastWeightConfig) -> float:
    """fla's chunk kernel (the NTP forward on CUDA), estimated as DeltaNet's is (training/estimate.py) from the
    tensors kept, not measured: bf16 norm and in_proj inputs, in_proj's output (q, k, v, z, beta, alpha), the conv's
    input and output, q and k normalised and repeated to the value heads, beta, g and its in-chunk cumulative sum
    (fp32), the chunk-start states, o, its norm and the gated product."""
    qk, v, heads = _dims(config)
    h, Dk = config.hidden_size, config.linear_key_head_dim
    proj, conv = 2 * qk + 2 * v + 2 * heads, 2 * qk + v
    states = gated_deltanet_state_values(config) / config.delta_rule_chunk_size
    return 2 * (2 * h + proj + 2 * conv + 2 * heads * Dk + heads + 2 * 2 * heads + states + 3 * v)


def gated_deltanet_branch_bytes(config: FastWeightConfig) -> float:
    """REFINE's branch states on fla's kernel, as DeltaNet's (`deltanet_branch_bytes`): the chained kernel's bf16
    copies of k (at the value heads), v and beta, fp32 g, and fla's per-chunk matrix A [T, HV, 64]. An estimate
    from the tensors `chunk_gated_delta_rule` saves (fla 0.6), not measured."""
    _, v, heads = _dims(config)
    return 2 * (heads * config.linear_key_head_dim + v + heads + 2 * heads + 64 * heads)


# fla's GatedDeltaNetConfig defaults (architectures.md; the layout of fla-hub's gated_deltanet-1.3B): h 2048, 21
# layers, 6 heads of key dim 256 and value dim 512 (expand_v 2), conv 4, fla's MLP width.
PRESETS = {
    "gated_deltanet_1p3b": dict(
        mixer="gated_deltanet", num_layers=21, hidden_size=2048, num_attention_heads=6,
        linear_num_key_heads=6, linear_num_value_heads=6, linear_key_head_dim=256, linear_value_head_dim=512,
        linear_conv_kernel_dim=4, ffn_hidden_size=fla_intermediate_size(2048),
    ),
    # Two value heads per key head, so the CPU tests cover megatron-core's grouped q / k.
    "gated_deltanet_tiny": dict(
        mixer="gated_deltanet", num_layers=2, hidden_size=64, num_attention_heads=4,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, ffn_hidden_size=128, delta_rule_chunk_size=16,
    ),
}

MIXER = MixerSpec(
    name="gated_deltanet",
    symbol="G",
    module_spec=lambda backend: ModuleSpec(
        module=GatedDeltaNetMixer, submodules=GatedDeltaNetSubmodules(in_proj=backend.column, out_proj=backend.row)),
    check_config=check_gated_deltanet_config,
    parameter_count=gated_deltanet_parameter_count,
    activation_bytes=gated_deltanet_activation_bytes,
    branch_bytes=gated_deltanet_branch_bytes,
    state_values=gated_deltanet_state_values,
    hf_module="megatron_refine.conversion.gated_deltanet",
    config_fields=GatedDeltaNetFields,
    presets=PRESETS,
    fla_layer="GatedDeltaNet",
    state_heads=lambda c: (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),  # q, k repeated
    short_conv=lambda c: (2 * c.linear_num_key_heads * c.linear_key_head_dim
                          + c.linear_num_value_heads * c.linear_value_head_dim, c.linear_conv_kernel_dim),  # q, k, v
)
