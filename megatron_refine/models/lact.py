"""LaCT token mixer (the authors' `lact_swiglu` layer): sliding-window attention + fast-weight SwiGLU.

Parallel layout (TP size t): the attention heads and the fast-weight heads are both split across ranks
(rank r holds the hidden channels [r h/t, (r+1) h/t), which are whole heads of both kinds).
    qkv              column-parallel  h -> [q h | k h | v h], each piece /t (shared by SWA and the fast path)
    lr_proj          column-parallel  h -> 3 rates per fast head (w0, w1, w2), with bias
    momentum_proj    column-parallel  h -> 1 coefficient per fast head, with bias (then sigmoid)
    ttt_scale_proj   column-parallel  h -> 1 output scale per fast head, with bias (then silu)
    qk_scale, qk_offset, w0, w1, w2   sharded by channel / head along dim 0
    ttt_norm         one weight of the fast head dim shared by all heads (gradient all-reduced over TP)
    out_proj         row-parallel     h -> h
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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
from megatron_refine.models.common import l2_norm, l2_norm_lact, mixer_sharded_state_dict, param_device, split_fused
from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.inference import BranchRequest, ContinueRequest, DecodeRequest, gather_window
from megatron_refine.models.norm import HeadRMSNorm
from megatron_refine.models.packing import Packing

L2_NORMS = {"lact": l2_norm_lact, "fla": l2_norm}  # FastWeightConfig.ttt_l2_norm


@dataclass
class LaCTSubmodules:
    qkv: ModuleSpec | type = IdentityOp
    lr_proj: ModuleSpec | type = IdentityOp
    momentum_proj: ModuleSpec | type = IdentityOp
    ttt_scale_proj: ModuleSpec | type = IdentityOp
    out_proj: ModuleSpec | type = IdentityOp


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

        column = dict(config=config, init_method=config.init_method, gather_output=False, skip_bias_add=False, is_expert=False)
        self.qkv = build_module(submodules.qkv, h, 3 * h, bias=False, tp_comm_buffer_name="qkv", **column)
        self.lr_proj = build_module(submodules.lr_proj, h, 3 * config.num_lact_heads, bias=True, **column)
        if config.use_momentum:
            self.momentum_proj = build_module(submodules.momentum_proj, h, config.num_lact_heads, bias=True, **column)
        if config.learnable_ttt_scale:
            self.ttt_scale_proj = build_module(submodules.ttt_scale_proj, h, config.num_lact_heads, bias=True, **column)

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
        self.request: BranchRequest | DecodeRequest | None = None

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

    def _project(self, module, hidden_states, decoding):
        y, _ = module(hidden_states)
        return y if decoding else y.transpose(0, 1)  # [B, T, ...]

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """[s(/t), b, h] -> ([s(/t), b, h], bias). In decoding the rows are the sequence dim: [N(/t), 1, h].

        `packed_seq_params` (document starts, see models/packing.py) restarts the fast weights, the sliding
        window and the RoPE positions at every document.
        """
        cfg, request = self.config, self.request
        decoding = isinstance(request, DecodeRequest)
        qkv = self._project(self.qkv, hidden_states, decoding)  # [B, T, 3h/t]
        B, T = qkv.shape[:2]
        q, k, v = qkv.chunk(3, dim=-1)
        packing = None if decoding else Packing.from_params(packed_seq_params, B, T)
        if packing is not None and isinstance(request, ContinueRequest):
            raise ValueError("a continuation from a cache runs one sequence per row: pass no packed_seq_params")
        packed = (lambda t: t.reshape(1, B * T, *t.shape[2:])) if packing else (lambda t: t)  # noqa: E731
        cache: LaCTCache | None = None
        if isinstance(request, (DecodeRequest, ContinueRequest)):
            cache = request.cache.layers.get(self.layer_number) or self._empty_cache(B, q)
            positions = request.cache.positions[:, None] + torch.arange(T, device=q.device)  # [N, T]
        elif packing is not None:
            positions = packing.position_ids
        else:
            positions = torch.arange(T, device=q.device).expand(B, T)
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
            fq, fk, fv = F.silu(fq), F.silu(fk), F.silu(fv)
        fq, fk = self.l2_norm(fq), self.l2_norm(fk)
        if not cfg.ttt_nope:
            fq = fw_heads(apply_rope(heads(fq), cos, sin))
            fk = fw_heads(apply_rope(heads(fk), cos, sin))
        acc = compute_dtype(q)
        lr = F.softplus(self._project(self.lr_proj, hidden_states, decoding).to(acc) + self.base_lr_inv)
        lr0, lr1, lr2 = lr.reshape(B, T, self.num_fw_heads, 3).unbind(-1)
        momentum = None
        if cfg.use_momentum:
            momentum = torch.sigmoid(self._project(self.momentum_proj, hidden_states, decoding).to(acc))

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
            branching = isinstance(request, BranchRequest)
            fo, _, *states_after = lact_swiglu(*args, output_states_after=branching, **kw)
            fo = fo.view(B, T, *fo.shape[2:])
            if branching:
                request.readers[self.layer_number] = functools.partial(
                    self._cache_after, states_after[0], ka, va, packing)

        fo = self.ttt_norm(fo)
        if cfg.learnable_ttt_scale:
            scale = F.silu(self._project(self.ttt_scale_proj, hidden_states, decoding).to(acc))
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
        # qk_scale, qk_offset, w1 (and full-rank w0, w2) are sharded along dim 0, as are low-rank factors.
        own = {name: 0 for name, _ in self.named_parameters(recurse=False)}
        low_rank = {n: {"w_left": 0, "w_right": 0} for n, c in self.named_children() if isinstance(c, LowRankFastWeight)}
        state = mixer_sharded_state_dict(self, prefix, sharded_offsets, metadata, own, low_rank)
        h = self.config.hidden_size
        split_fused(state, f"{prefix}qkv.weight", [("query", h), ("key", h), ("value", h)], self.tp)
        return state
