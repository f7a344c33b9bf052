"""DeltaNet token mixer (fla's `DeltaNet` layer) as a tensor- and sequence-parallel Megatron module.

Parallel layout (TP size t): heads split across ranks.
    in_proj   column-parallel  h -> [q key_dim | k key_dim | v value_dim | beta H | gate value_dim], each piece /t
    conv1d    depthwise over this rank's q|k|v channels, no communication
    o_norm    one weight of the value head dim shared by all heads (gradient all-reduced over TP)
    out_proj  row-parallel     value_dim -> h
Under sequence parallelism the input is [s/t, b, h]: in_proj gathers the sequence, out_proj reduce-scatters it.
"""

from __future__ import annotations

import functools
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

from megatron_refine.kernels import (
    context_parallel_delta_rule, delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step)
from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.models.common import (
    causal_conv1d, fla_intermediate_size, l2_norm, mixer_sharded_state_dict, param_device, split_fused)
from megatron_refine.models.context_parallel import short_conv_piece
from megatron_refine.models.inference import (
    BranchRequest, ContinueRequest, DecodeRequest, PrefillRequest, gather_window, request_inputs)
from megatron_refine.models.mixers import MixerSpec
from megatron_refine.models.norm import HeadRMSNorm
from megatron_refine.models.packing import Packing

if TYPE_CHECKING:  # the config inherits DeltaNetFields through the mixer table
    from megatron_refine.models.config import FastWeightConfig


@dataclass
class DeltaNetFields:
    """FastWeightConfig's DeltaNet fields, in fla's DeltaNetConfig names."""

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

    @property
    def key_dim(self) -> int:
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return round(self.hidden_size * self.expand_v)


@dataclass
class DeltaNetSubmodules:
    in_proj: ModuleSpec | type = IdentityOp
    out_proj: ModuleSpec | type = IdentityOp


@dataclass
class DeltaNetCache:
    """One layer's decoding state for N rows (this TP rank's heads and channels)."""

    state: torch.Tensor  # [N, H/t, K, V], fp32
    conv: torch.Tensor | None  # [N, W-1, conv channels / t]: the last W-1 pre-conv q|k|v inputs


class DeltaNetMixer(MegatronModule):
    def __init__(
        self,
        config: FastWeightConfig,
        submodules: DeltaNetSubmodules,
        layer_number: int | None = None,
        **kwargs,
    ):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp = tp = parallel_state.get_tensor_model_parallel_world_size()
        H = config.num_attention_heads
        self.num_heads = H // tp
        self.head_k_dim, self.head_v_dim = config.key_dim // H, config.value_dim // H
        self.pieces = [("query", config.key_dim), ("key", config.key_dim), ("value", config.value_dim)]
        self.pieces += [("beta", H)] if config.use_beta else []
        self.pieces += [("gate", config.value_dim)] if config.use_gate else []
        self.local_sizes = [size // tp for _, size in self.pieces]
        self.conv_channels = sum(self.local_sizes[:3])

        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, sum(size for _, size in self.pieces), config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv",
        )
        if config.use_short_conv:
            self.conv1d = torch.nn.Conv1d(
                self.conv_channels, self.conv_channels, config.conv_size, groups=self.conv_channels,
                bias=False, device=param_device(config), dtype=config.params_dtype,
            )
            set_tensor_model_parallel_attributes(self.conv1d.weight, is_parallel=True, dim=0, stride=1)
            if config.perform_initialization:
                with get_cuda_rng_tracker().fork():  # channels differ per TP rank
                    torch.nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        if config.use_output_norm:
            self.o_norm = HeadRMSNorm(config, self.head_v_dim, eps=config.layernorm_epsilon)
        self.out_proj = build_module(
            submodules.out_proj, config.value_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
        )
        # The model sets it for one call (why not an argument: models/inference.py)
        self.request: BranchRequest | PrefillRequest | DecodeRequest | ContinueRequest | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """[s(/t), b, h] -> ([s(/t), b, h], bias). In decoding the rows are the sequence dim: [N(/t), 1, h].

        `packed_seq_params` (document starts, see models/packing.py) restarts the state and the short
        convolution at every document.
        """
        cfg = self.config
        x, packing, cache = project_inputs(self, hidden_states, packed_seq_params)  # [B, T, in/t]
        B, T = x.shape[:2]
        qkv, rest = x[..., : self.conv_channels], x[..., self.conv_channels :]
        conv_tail, conv_inputs = None, None
        if cfg.use_short_conv:
            qkv, conv_tail, conv_inputs = short_conv(self.conv1d, qkv, packing, cache)
        q, k, v = qkv.split(self.local_sizes[:3], dim=-1)
        if cfg.qk_activation == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(v)
        q = q.reshape(B, T, self.num_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_heads, self.head_v_dim)
        if cfg.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif cfg.qk_activation == "elu":
            q, k = F.elu(q) + 1, F.elu(k) + 1
        if cfg.qk_norm == "l2":
            q, k = l2_norm(q), l2_norm(k)
        else:
            q, k = (F.normalize(t.to(compute_dtype(t)), p=1, dim=-1, eps=1e-6).to(t.dtype) for t in (q, k))
        extra = rest.split(self.local_sizes[3:], dim=-1) if rest.shape[-1] else ()
        beta = extra[0].sigmoid() if cfg.use_beta else torch.ones_like(q[..., 0])
        if cfg.allow_neg_eigval:
            beta = beta * 2.0

        o = run_delta_rule(self, q, k, v, None, beta, cache, conv_tail, conv_inputs, packing,
                           cfg.conv_size)  # [B, T, H/t, V]
        if cfg.use_output_norm:
            gate = extra[-1].reshape(B, T, self.num_heads, self.head_v_dim) if cfg.use_gate else None
            o = self.o_norm(o, gate)
        o = o.reshape(B, T, -1)
        o = o if isinstance(self.request, DecodeRequest) else o.transpose(0, 1)
        return self.out_proj(o.contiguous())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata, {}, {"conv1d": {"weight": 0}})
        split_fused(state, f"{prefix}in_proj.weight", self.pieces, self.tp)
        if self.config.use_short_conv:
            split_fused(state, f"{prefix}conv1d.weight", self.pieces[:3], self.tp)
        return state


def project_inputs(layer: MegatronModule, hidden_states: torch.Tensor, packed_seq_params
                   ) -> tuple[torch.Tensor, Packing | None, DeltaNetCache | None]:
    """The opening of a DeltaNet or Gated DeltaNet layer's forward: its fused input projection as [B, T, in/t]
    (decoding: the rows as B, T = 1), the documents packed in the rows, and the layer's cache for a request that
    continues one."""
    x, _ = layer.in_proj(hidden_states)
    x = x if isinstance(layer.request, DecodeRequest) else x.transpose(0, 1)
    return x, *request_inputs(layer, packed_seq_params, *x.shape[:2], x.device)


def short_conv(conv1d: torch.nn.Conv1d, x: torch.Tensor, packing: Packing | None, cache: DeltaNetCache | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The causal depthwise convolution over x [B, T, channels], restarting at every packed document and
    continuing a cache's tail -> (its output [B, T, channels], the new tail, the inputs the branch readers read their
    windows from: x, or under context parallelism x after the previous rank's last W - 1 inputs)."""
    B, T = x.shape[:2]
    if packing is not None and packing.first_positions is not None:  # a context-parallel piece
        y, window = short_conv_piece(conv1d.weight[:, 0], x, packing)
        return y, None, window
    inputs = x.reshape(1, B * T, -1) if packing else x
    y, tail = causal_conv1d(inputs, conv1d.weight[:, 0], cache.conv if cache else None,
                            packing.cu_seqlens if packing else None)
    return y.view(B, T, -1), tail, x


def run_delta_rule(layer: MegatronModule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                   beta: torch.Tensor, cache: DeltaNetCache | None, conv_tail: torch.Tensor | None,
                   conv_inputs: torch.Tensor | None, packing: Packing | None, conv_size: int) -> torch.Tensor:
    """The delta rule of a DeltaNet or (given the log decay g [B, T, H]) Gated DeltaNet layer under its inference
    request (`layer.request`, models/inference.py): q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (decoding:
    T = 1, B = rows) -> o [B, T, H, V]. Decoding writes the layer's new cache; a branching forward or a prefill
    registers the reader of its caches after chosen positions (conv tails from conv_inputs [B, T, channels])."""
    request, number = layer.request, layer.layer_number
    B, T, H = beta.shape
    gate = () if g is None else (g,)
    if isinstance(request, DecodeRequest):
        state = cache.state if cache else q.new_zeros(B, H, q.shape[-1], v.shape[-1], dtype=compute_dtype(q))
        step = delta_rule_step if g is None else gated_delta_rule_step
        o, state = step(q[:, 0], k[:, 0], v[:, 0], *(t[:, 0] for t in gate), beta[:, 0], state)
        request.cache.layers[number] = DeltaNetCache(state, conv_tail)
        return o[:, None]  # [N, 1, H, V]
    branching, prefill = isinstance(request, BranchRequest), isinstance(request, PrefillRequest)
    if packing is not None and packing.first_positions is not None:  # a context-parallel piece
        o, _, *states_after = context_parallel_delta_rule(
            q, k, v, beta, g=g, group=parallel_state.get_context_parallel_group(), cu_seqlens=packing.cu_seqlens,
            continues=packing.continues, chunk_size=layer.config.delta_rule_chunk_size, output_states_after=branching)
    else:
        packed = (lambda t: t.reshape(1, B * T, *t.shape[2:])) if packing else (lambda t: t)  # noqa: E731
        kw = dict(chunk_size=layer.config.delta_rule_chunk_size, cu_seqlens=packing.cu_seqlens if packing else None)
        if isinstance(request, ContinueRequest):
            kw["initial_state"] = cache.state if cache else None
        rule = delta_rule if g is None else gated_delta_rule
        o, final_state, *states_after = rule(*map(packed, (q, k, v, *gate, beta)), output_final_state=prefill,
                                             output_states_after=branching, **kw)
    if branching or prefill:
        read = states_after[0] if branching else functools.partial(_at_sequence_ends, final_state)
        request.readers[number] = functools.partial(_cache_after, read, conv_inputs, packing, conv_size)
    return o.view(B, T, *o.shape[2:])


def _cache_after(states_after, conv_inputs: torch.Tensor | None, packing: Packing | None, conv_size: int,
                 positions: torch.Tensor) -> DeltaNetCache:
    """A layer's decoding cache after positions [B, P] (B * P rows), read from its training forward. conv_inputs
    [B, T + extra, channels]: `short_conv`'s window inputs, whose first `extra` steps precede the rows' first token (the
    previous context-parallel piece's)."""
    starts = packing.document_starts(positions) if packing else None
    tails = None
    if conv_inputs is not None:
        extra = conv_inputs.shape[1] - packing.length if packing else 0
        tails = gather_window(conv_inputs, positions + extra, conv_size - 1,
                              None if starts is None else starts + extra)[0]
    return DeltaNetCache(states_after(packing.flat(positions) if packing else positions).flatten(0, 1), tails)


def _at_sequence_ends(final_state: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A prefill's states_after: positions [B, 1] (or [1, N] packed) are every sequence's last token, whose states
    are the kernel's final states [B or N, H, K, V]."""
    return final_state.view(*positions.shape, *final_state.shape[1:])


def check_deltanet_config(config: FastWeightConfig) -> None:
    for name, dim in (("key", config.key_dim), ("value", config.value_dim)):
        if dim % config.num_attention_heads != 0:
            raise ValueError(
                f"DeltaNet {name} dim hidden_size * expand_{name[0]} = {dim} must be divisible by "
                f"num_attention_heads ({config.num_attention_heads})"
            )
    if config.qk_norm not in ("l2", "sum"):
        raise ValueError(f"qk_norm must be 'l2' or 'sum', got {config.qk_norm!r}")
    if config.qk_activation not in ("silu", "relu", "elu", "identity"):
        raise ValueError(f"qk_activation must be silu, relu, elu or identity, got {config.qk_activation!r}")
    if config.use_short_conv and config.conv_size < 1:
        raise ValueError(f"conv_size must be >= 1 with use_short_conv, got {config.conv_size}")


def deltanet_parameter_count(config: FastWeightConfig) -> int:
    c, h = config, config.hidden_size
    heads, k, v = c.num_attention_heads, c.key_dim, c.value_dim
    count = h * (2 * k + v + heads * c.use_beta + v * c.use_gate) + v * h
    return count + (2 * k + v) * c.conv_size * c.use_short_conv + (v // heads) * c.use_output_norm


def deltanet_state_values(config: FastWeightConfig) -> int:
    """A DeltaNet layer's fast-weight state: H x dk x dv values."""
    heads = config.num_attention_heads
    return heads * (config.key_dim // heads) * (config.value_dim // heads)


def deltanet_activation_bytes(config: FastWeightConfig) -> float:
    """fla's chunk kernel (the NTP forward on CUDA): from the tensors it saves (training/estimate.py)."""
    c, h = config, config.hidden_size
    heads, k, v = c.num_attention_heads, c.key_dim, c.value_dim
    proj = 2 * k + v + heads
    states = deltanet_state_values(c) / c.delta_rule_chunk_size  # chunk-start states
    return 2 * (2 * h + proj + (2 * k + v) * 2 + heads + states + 3 * v)  # norm, in_proj, conv, o, o_norm


def deltanet_reference_bytes(config: FastWeightConfig) -> float:
    """Bytes DeltaNet's PyTorch chunked path (the REFINE forward that keeps branch states) keeps per token of a
    layer's mixer: fp32, measured on a CPU with saved-tensor hooks (h 512-1024, T 1024): about 88 h, plus the
    fp32 chunk-start states (the hand-written backward of `kernels/delta_rule/chunk.py` keeps less than autograd
    did: 112 h before)."""
    return 88 * config.hidden_size + 4 * deltanet_state_values(config) / config.delta_rule_chunk_size


def deltanet_branch_bytes(config: FastWeightConfig) -> float:
    """Bytes a token of a layer's mixer keeps for REFINE's branch states on fla's kernel (on CUDA): the chained
    kernel's bf16 copies of k, v and beta and fla's saved A [T, H, 64] (its q is k: no copy). From the tensors
    `chunk_delta_rule` saves (fla 0.6), not measured: fla's kernels do not run on a CPU outside the interpreter."""
    heads = config.num_attention_heads
    return 2 * (config.key_dim + config.value_dim + heads + 64 * heads)


# fla-hub/delta_net-1.3B-100B (architectures.md); past 1.3B (recipes/, docs/scaling.md) our layouts in the 1.3B's
# proportions (head dim 128, fla's MLP width): no DeltaNet checkpoints of these sizes are published.
PRESETS = {
    "deltanet_1p3b": dict(
        mixer="deltanet", num_layers=24, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=fla_intermediate_size(2048),
    ),
    "deltanet_2p7b": dict(
        mixer="deltanet", num_layers=32, hidden_size=2560, num_attention_heads=20,
        ffn_hidden_size=fla_intermediate_size(2560),
    ),
    "deltanet_7b": dict(
        mixer="deltanet", num_layers=32, hidden_size=4096, num_attention_heads=32,
        ffn_hidden_size=fla_intermediate_size(4096),
    ),
    "deltanet_tiny": dict(
        mixer="deltanet", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        delta_rule_chunk_size=16,
    ),
}

MIXER = MixerSpec(
    name="deltanet",
    symbol="N",
    module_spec=lambda backend: ModuleSpec(
        module=DeltaNetMixer, submodules=DeltaNetSubmodules(in_proj=backend.column, out_proj=backend.row)),
    check_config=check_deltanet_config,
    parameter_count=deltanet_parameter_count,
    activation_bytes=deltanet_activation_bytes,
    branch_bytes=deltanet_branch_bytes,
    state_values=deltanet_state_values,
    hf_module="megatron_refine.conversion.deltanet",
    config_fields=DeltaNetFields,
    presets=PRESETS,
    fla_layer="DeltaNet",
    state_heads=lambda c: (c.num_attention_heads, c.key_dim // c.num_attention_heads,
                           c.value_dim // c.num_attention_heads),
    short_conv=lambda c: (2 * c.key_dim + c.value_dim, c.conv_size) if c.use_short_conv else None,  # q, k, v
)
