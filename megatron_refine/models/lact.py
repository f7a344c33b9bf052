"""LaCT token mixer (the authors' `lact_swiglu` layer): sliding-window attention + fast-weight SwiGLU.

Parallel layout (TP size t): the attention heads and the fast-weight heads are both split across ranks
(rank r holds the hidden channels [r h/t, (r+1) h/t), which are whole heads of both kinds).
    in_proj          column-parallel  h -> [q h | k h | v h | lr 3F | momentum F | scale F], each piece /t (F fast
                     heads): q, k, v (shared by SWA and the fast path), 3 rates per fast head (w0, w1, w2), 1
                     momentum coefficient (then sigmoid), 1 output scale (then silu); the last two as configured
    rate_bias        the rates' biases [lr 3F | momentum F | scale F], each piece /t, added after the split (q, k,
                     v have none)
    qk_scale, qk_offset, w0, w1, w2   sharded by channel / head along dim 0
    ttt_norm         one weight of the fast head dim shared by all heads (gradient all-reduced over TP)
    out_proj         row-parallel     h -> h
Under sequence parallelism the input is [s/t, b, h]: in_proj gathers the sequence (once), out_proj reduce-scatters it.
Checkpoints keep the keys of the projections in_proj fuses (`qkv.weight.query`, `lr_proj.weight`, `lr_proj.bias`,
...: `input_projections`), so they load across TP sizes and from before the fusion.
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

from megatron_refine.kernels import LaCTState, lact_swiglu, lact_swiglu_step, low_rank_fast_weight
from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.models.attention import (
    apply_rope,
    rope_cos_sin,
    sliding_window_attention,
    window_attention_step,
)
from megatron_refine.models.common import (
    fla_intermediate_size,
    l2_norm,
    l2_norm_lact,
    mixer_sharded_state_dict,
    param_device,
    split_fused_into,
)
from megatron_refine.models.inference import (
    BranchRequest, ContinueRequest, DecodeRequest, PrefillRequest, gather_window, request_inputs, token_positions)
from megatron_refine.models.mixers import MixerSpec
from megatron_refine.models.norm import HeadRMSNorm
from megatron_refine.models.packing import Packing

if TYPE_CHECKING:  # the config inherits LaCTFields through the mixer table
    from megatron_refine.models.config import FastWeightConfig

L2_NORMS = {"lact": l2_norm_lact, "fla": l2_norm}  # FastWeightConfig.ttt_l2_norm


@dataclass
class LaCTFields:
    """FastWeightConfig's LaCT fields, in the authors' lact_swiglu names."""

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

    @property
    def lact_head_dim(self) -> int:
        return self.hidden_size // self.num_lact_heads


@dataclass
class LaCTSubmodules:
    in_proj: ModuleSpec | type = IdentityOp
    out_proj: ModuleSpec | type = IdentityOp


def input_projections(config: FastWeightConfig) -> list[tuple[str, int]]:
    """The projections of the hidden state that `in_proj` fuses, in its row order: (name, global rows). The first,
    qkv, has no bias; the others, the fast heads' rates, add their piece of `rate_bias`. Checkpoints and the HF
    format keep each under its own name."""
    h, fw = config.hidden_size, config.num_lact_heads
    projections = [("qkv", 3 * h), ("lr_proj", 3 * fw)]
    projections += [("momentum_proj", fw)] if config.use_momentum else []
    projections += [("ttt_scale_proj", fw)] if config.learnable_ttt_scale else []
    return projections


@dataclass
class LaCTCache:
    """One layer's decoding state for N rows (this TP rank's heads)."""

    fast: LaCTState
    k_window: torch.Tensor  # [N, W-1, heads/t, head dim]: keys (after RoPE) of the previous W-1 tokens
    v_window: torch.Tensor
    valid: torch.Tensor  # [N, W-1], False where the window reaches before the sequence start


def _sharded_param(shape, config: FastWeightConfig, init) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(*shape, device=param_device(config), dtype=config.params_dtype))
    set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
    if config.perform_initialization:
        with get_cuda_rng_tracker().fork():
            init(p)
    return p


class LowRankFastWeight(torch.nn.Module):
    """An initial fast weight parameterised as w_left @ w_right + 0.5 I (LaCT's w0_w2_low_rank), initialised as the
    authors do: std gain / sqrt(rank) for w_left, gain / sqrt(in features) for w_right."""

    def __init__(self, heads: int, rows: int, cols: int, rank: int, gain: float, config: FastWeightConfig):
        super().__init__()
        left, right = gain / math.sqrt(rank), gain / math.sqrt(cols)
        self.w_left = _sharded_param((heads, rows, rank), config, lambda p: torch.nn.init.normal_(p, std=left))
        self.w_right = _sharded_param((heads, rank, cols), config, lambda p: torch.nn.init.normal_(p, std=right))

    def forward(self) -> torch.Tensor:
        return low_rank_fast_weight(self.w_left, self.w_right)


class LaCTMixer(MegatronModule):
    def __init__(self, config: FastWeightConfig, submodules: LaCTSubmodules, layer_number: int | None = None, **kwargs):
        super().__init__(config)
        self.layer_number = layer_number
        self.tp = tp = parallel_state.get_tensor_model_parallel_world_size()
        h = config.hidden_size
        self.local_hidden = h // tp
        self.num_heads, self.head_dim = config.num_attention_heads // tp, config.attention_head_dim
        self.num_fw_heads, self.fw_dim = config.num_lact_heads // tp, config.lact_head_dim
        fw_hidden = int(self.fw_dim * config.inter_multi)
        self.base_lr_inv = math.log(math.expm1(config.lact_base_lr))  # softplus(base_lr_inv) = base lr

        self.projections = input_projections(config)
        self.local_sizes = [rows // tp for _, rows in self.projections]
        self.in_proj = build_module(
            submodules.in_proj, h, sum(rows for _, rows in self.projections), config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv",
        )
        # One bias vector for the rates (zeros, as ColumnParallelLinear's), added after the split: q, k, v get none.
        self.rate_bias = _sharded_param((sum(self.local_sizes[1:]),), config, torch.nn.init.zeros_)

        self.qk_scale = _sharded_param((self.local_hidden, 2), config, torch.nn.init.ones_)
        self.qk_offset = _sharded_param((self.local_hidden, 2), config, torch.nn.init.zeros_)
        fw = self.num_fw_heads
        if config.w0_w2_low_rank > 0:
            rank, gain = config.w0_w2_low_rank, config.fw_init_gain
            self.w0 = LowRankFastWeight(fw, fw_hidden, self.fw_dim, rank, gain, config)
            self.w2 = LowRankFastWeight(fw, fw_hidden, self.fw_dim, rank, gain, config)
        else:
            full = lambda p: torch.nn.init.normal_(p, std=1 / math.sqrt(self.fw_dim))  # noqa: E731
            self.w0 = _sharded_param((fw, fw_hidden, self.fw_dim), config, full)
            self.w2 = _sharded_param((fw, fw_hidden, self.fw_dim), config, full)
        self.w1 = _sharded_param(
            (fw, self.fw_dim, fw_hidden), config, lambda p: torch.nn.init.normal_(p, std=1 / math.sqrt(fw_hidden))
        )
        self.l2_norm = L2_NORMS[config.ttt_l2_norm]
        self.ttt_norm = HeadRMSNorm(config, self.fw_dim, eps=config.ttt_norm_eps)
        self.out_proj = build_module(
            submodules.out_proj, h, h, config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj",
        )
        # The model sets it for one call (why not an argument: models/inference.py)
        self.request: BranchRequest | PrefillRequest | DecodeRequest | ContinueRequest | None = None

    def initial_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w0 = self.w0() if isinstance(self.w0, LowRankFastWeight) else self.w0
        w2 = self.w2() if isinstance(self.w2, LowRankFastWeight) else self.w2
        return w0, self.w1, w2

    def _empty_cache(self, rows: int, like: torch.Tensor) -> LaCTCache:
        cfg = self.config
        fast = LaCTState.initial(*self.initial_weights(), rows, cfg.lact_chunk_size, use_momentum=cfg.use_momentum)
        window = like.new_zeros(rows, cfg.window_size - 1, self.num_heads, self.head_dim)
        valid = torch.zeros(rows, cfg.window_size - 1, dtype=torch.bool, device=like.device)
        return LaCTCache(fast, window, window.clone(), valid)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """[s(/t), b, h] -> ([s(/t), b, h], bias). In decoding the rows are the sequence dim: [N(/t), 1, h].

        `packed_seq_params` (document starts, see models/packing.py) restarts the fast weights, the sliding
        window and the RoPE positions at every document.
        """
        cfg, request = self.config, self.request
        decoding = isinstance(request, DecodeRequest)
        x, _ = self.in_proj(hidden_states)
        x = x if decoding else x.transpose(0, 1)  # [B, T, in/t]; decoding: B = rows, T = 1
        B, T = x.shape[:2]
        qkv, *rates = x.split(self.local_sizes, dim=-1)
        q, k, v = qkv.chunk(3, dim=-1)  # [B, T, h/t] each
        acc = compute_dtype(q)
        biases = self.rate_bias.split(self.local_sizes[1:])
        rates = {name: r.to(acc) + b.to(acc) for (name, _), r, b in zip(self.projections[1:], rates, biases)}
        packing, cache = request_inputs(self, packed_seq_params, B, T, x.device)
        packed = (lambda t: t.reshape(1, B * T, *t.shape[2:])) if packing else (lambda t: t)  # noqa: E731
        if isinstance(request, (DecodeRequest, ContinueRequest)):
            cache = cache or self._empty_cache(B, q)
        positions = token_positions(request, packing, B, T, q.device)
        cos, sin = rope_cos_sin(positions, self.head_dim, cfg.rope_theta)  # [B, T, 1, hd]

        # Sliding-window attention on the raw q, k, v.
        heads = lambda x: x.reshape(B, T, -1, self.head_dim)  # noqa: E731
        qa, ka, va = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
        if decoding:
            o_swa = window_attention_step(qa[:, 0], ka[:, 0], va[:, 0], cache.k_window, cache.v_window, cache.valid)[:, None]
        else:
            past = (cache.k_window, cache.v_window, cache.valid) if cache is not None else None
            o_swa = sliding_window_attention(qa, ka, va, cfg.window_size, packing.sequence_ids if packing else None, past)

        # Fast-weight path: per-channel rescale, SiLU, per-head L2 norm, RoPE per attention-head slice.
        fq = q * self.qk_scale[:, 0] + self.qk_offset[:, 0]
        fk = k * self.qk_scale[:, 1] + self.qk_offset[:, 1]
        fw_heads = lambda x: x.reshape(B, T, self.num_fw_heads, self.fw_dim)  # noqa: E731
        fq, fk, fv = fw_heads(fq), fw_heads(fk), fw_heads(v)
        if cfg.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            fv = fv if cfg.no_v_silu else F.silu(fv)
        fq, fk = self.l2_norm(fq), self.l2_norm(fk)
        if not cfg.ttt_nope:
            fq = fw_heads(apply_rope(heads(fq), cos, sin))
            fk = fw_heads(apply_rope(heads(fk), cos, sin))
        lr = F.softplus(rates["lr_proj"] + self.base_lr_inv)
        lr0, lr1, lr2 = lr.reshape(B, T, self.num_fw_heads, 3).unbind(-1)
        momentum = torch.sigmoid(rates["momentum_proj"]) if cfg.use_momentum else None

        if decoding:
            fo, fast = lact_swiglu_step(
                fq[:, 0], fk[:, 0], fv[:, 0], lr0[:, 0], lr1[:, 0], lr2[:, 0], cache.fast,
                momentum=None if momentum is None else momentum[:, 0], use_muon=cfg.use_muon,
            )
            fo = fo[:, None]
            request.cache.layers[self.layer_number] = LaCTCache(
                fast,
                torch.cat([cache.k_window[:, 1:], ka], dim=1),
                torch.cat([cache.v_window[:, 1:], va], dim=1),
                torch.cat([cache.valid[:, 1:], cache.valid.new_ones(B, 1)], dim=1),
            )
        else:
            args = [packed(x) for x in (fq, fk, fv, lr0, lr1, lr2)]
            kw = dict(chunk_size=cfg.lact_chunk_size, momentum=None if momentum is None else packed(momentum),
                      use_muon=cfg.use_muon, cu_seqlens=packing.cu_seqlens if packing else None)
            if isinstance(request, ContinueRequest):
                args += [None, None, None]
                kw["initial_state"] = cache.fast
            else:
                args += self.initial_weights()
            branching, prefill = isinstance(request, BranchRequest), isinstance(request, PrefillRequest)
            fo, final_state, *states_after = lact_swiglu(*args, output_final_state=prefill,
                                                         output_states_after=branching, **kw)
            fo = fo.view(B, T, *fo.shape[2:])
            if branching or prefill:  # a prefill's positions are every sequence's last token: the final states
                read = states_after[0] if branching else (lambda positions: final_state)
                request.readers[self.layer_number] = functools.partial(self._cache_after, read, ka, va, packing)

        fo = self.ttt_norm(fo)
        if cfg.learnable_ttt_scale:
            scale = F.silu(rates["ttt_scale_proj"])
            fo = (fo.to(acc) * scale[..., None]).to(fo.dtype)
        o = (o_swa.reshape(B, T, -1) + fo.reshape(B, T, -1)).to(hidden_states.dtype)
        o = o if decoding else o.transpose(0, 1)
        return self.out_proj(o.contiguous())

    def _cache_after(self, states_after, ka: torch.Tensor, va: torch.Tensor, packing: Packing | None,
                     positions: torch.Tensor) -> LaCTCache:
        """This layer's decoding cache after positions [B, P] (B * P rows), read from its training forward: the
        fast weights and the attention window's keys and values (after RoPE) [B, T, heads, hd]."""
        starts = packing.document_starts(positions) if packing else None
        k_window, valid = gather_window(ka, positions, self.config.window_size - 1, starts)
        v_window, _ = gather_window(va, positions, self.config.window_size - 1, starts)
        return LaCTCache(states_after(packing.flat(positions) if packing else positions), k_window, v_window, valid)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        # rate_bias, qk_scale, qk_offset, w1 (and full-rank w0, w2) are sharded along dim 0, as are low-rank factors.
        own = {name: 0 for name, _ in self.named_parameters(recurse=False)}
        low_rank = {n: {"w_left": 0, "w_right": 0} for n, c in self.named_children() if isinstance(c, LowRankFastWeight)}
        state = mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata, own, low_rank)
        # Each projection under its own key (q, k and v apart), as the separate modules saved them.
        h, rates = self.config.hidden_size, self.projections[1:]
        weights = [("qkv.weight.query", h), ("qkv.weight.key", h), ("qkv.weight.value", h)]
        weights += [(f"{n}.weight", rows) for n, rows in rates]
        split_fused_into(state, prefix, "in_proj.weight", weights, self.tp)
        split_fused_into(state, prefix, "rate_bias", [(f"{n}.bias", rows) for n, rows in rates], self.tp)
        return state


def check_lact_config(config: FastWeightConfig) -> None:
    tp, h = config.tensor_model_parallel_size, config.hidden_size
    if config.num_lact_heads % tp != 0:
        raise ValueError(
            f"num_lact_heads ({config.num_lact_heads}) must be divisible by tensor_model_parallel_size "
            f"({tp}): LaCT's fast-weight heads are split across TP ranks"
        )
    for name, n in (("num_attention_heads", config.num_attention_heads), ("num_lact_heads", config.num_lact_heads)):
        if h % n != 0:
            raise ValueError(f"hidden_size ({h}) must be divisible by {name} ({n})")
    if config.lact_head_dim % config.attention_head_dim != 0:
        raise ValueError(
            f"the LaCT head dim ({config.lact_head_dim}) must be a multiple of the attention head dim "
            f"({config.attention_head_dim}): RoPE is applied to the fast path per attention-head slice"
        )
    if config.lact_chunk_size < 1 or config.window_size < 1:
        raise ValueError("lact_chunk_size and window_size must be >= 1")
    if config.ttt_l2_norm not in L2_NORMS:
        raise ValueError(
            f"ttt_l2_norm must be one of {tuple(L2_NORMS)} (the LaCT authors' x / (||x|| + 1e-5), or fla's "
            f"x * rsqrt(||x||^2 + 1e-6)), got {config.ttt_l2_norm!r}"
        )
    if not config.ttt_norm_eps > 0:
        raise ValueError(f"ttt_norm_eps must be > 0 (the authors' value is 1e-5), got {config.ttt_norm_eps}")


def lact_parameter_count(config: FastWeightConfig) -> int:
    c, h = config, config.hidden_size
    fw, dim = c.num_lact_heads, c.lact_head_dim
    hidden = int(dim * c.inter_multi)
    count = 3 * h * h + h * h + (h + 1) * 3 * fw + 4 * h + fw * dim * hidden + dim
    count += (h + 1) * fw * (c.use_momentum + c.learnable_ttt_scale)
    rank = c.w0_w2_low_rank
    return count + 2 * fw * (hidden * rank + rank * dim if rank > 0 else hidden * dim)


def lact_state_values(config: FastWeightConfig) -> int:
    """A LaCT layer's fast weights w0, w1, w2: 3 x F x D x D * inter_multi values."""
    dim = config.lact_head_dim
    return 3 * config.num_lact_heads * dim * int(dim * config.inter_multi)


def lact_activation_bytes(config: FastWeightConfig) -> float:
    """The PyTorch chunked path (LaCT's only), fp32 fast-weight math, measured on a CPU (h 512-1024, T 1024-2048,
    chunks 128-512): about (60 + 300 dk / chunk) h bytes, the CPU's T x T masked attention taken out."""
    return config.hidden_size * (60 + 300 * config.lact_head_dim / config.lact_chunk_size)


# LaCT-760M's mixer settings (the authors' lact_swiglu config), which their 3B layout shares.
_LACT = dict(mixer="lact", num_attention_heads=24, num_lact_heads=4, lact_chunk_size=2048, window_size=2048,
             w0_w2_low_rank=32, use_momentum=True, use_muon=True, rope_theta=1e6)
PRESETS = {
    # LaCT-760M (lact_swiglu)
    "lact_760m": dict(**_LACT, num_layers=24, hidden_size=1536, ffn_hidden_size=fla_intermediate_size(1536)),
    # LaCT's 3B layout as the authors publish it (hidden 3072, 24 layers, 4 fast-weight heads), the rest as lact_760m
    "lact_3b": dict(**_LACT, num_layers=24, hidden_size=3072, ffn_hidden_size=fla_intermediate_size(3072)),
    "lact_tiny": dict(
        mixer="lact", num_layers=2, hidden_size=64, num_attention_heads=4, num_lact_heads=2,
        ffn_hidden_size=128, lact_chunk_size=16, window_size=12, w0_w2_low_rank=4,
    ),
}

MIXER = MixerSpec(
    name="lact",
    symbol="L",
    module_spec=lambda backend: ModuleSpec(
        module=LaCTMixer, submodules=LaCTSubmodules(in_proj=backend.column, out_proj=backend.row)),
    check_config=check_lact_config,
    parameter_count=lact_parameter_count,
    activation_bytes=lact_activation_bytes,
    branch_bytes=lambda config: 0.0,  # REFINE runs the same PyTorch path: the activations hold its branch states
    state_values=lact_state_values,
    hf_module="megatron_refine.conversion.lact",
    config_fields=LaCTFields,
    presets=PRESETS,
    parameter_order_changed=True,  # four input projections, fused into in_proj since
    uses_muon=lambda config: config.use_muon,
    context_parallel_refusal=(
        "LaCT's fast-weight update (SwiGLU weights trained by gradient steps, with Muon's Newton-Schulz) is not affine "
        "in the state it starts from, so a piece's effect cannot be computed before the state arrives: the ranks "
        "would run one after another (memory split, no speedup)"),
)
