"""Run fla's DeltaNet and Gated DeltaNet layers and models (`DeltaNetForCausalLM`, `GatedDeltaNetForCausalLM`, so a
`delta_net` or `gated_deltanet` export) on a CPU, with PyTorch references for the Triton kernels they call: the
(gated) delta-rule recurrence, the short causal conv, (gated) RMSNorm and SwiGLU. fla 0.6 has no CPU path. The
references follow the kernels' definitions, states included, so cached `generate` works; they are slow (the delta
rule is a loop over tokens), which suits checks and small models.

`use_pytorch_references()` patches fla for the rest of the process: call it in a process of its own (a spawned
rank, a script). Importing this module changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sequence(run, cu_seqlens, tensors, state, output_final_state):
    """fla's packed layout ([1, total, ...] pieces, cut at cu_seqlens [N+1]; what an attention mask unpads to) one
    sequence at a time, each from its row of `state` [N, ...] -> (outputs [1, total, ...], states [N, ...])."""
    bounds = cu_seqlens.tolist()
    outs = [run(*(t[:, s:e] for t in tensors), None if state is None else state[n : n + 1])
            for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return torch.cat([y for y, _ in outs], 1), (torch.cat([f for _, f in outs]) if output_final_state else None)


def _delta_rule(q, k, v, beta, initial_state=None, output_final_state=False, cu_seqlens=None,
                use_qk_l2norm_in_kernel=False, **_):
    """chunk_delta_rule / fused_recurrent_delta_rule: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], states
    [N, H, K, V]; fla's naive recurrence."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    if use_qk_l2norm_in_kernel:
        q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    if cu_seqlens is not None:
        run = lambda q, k, v, beta, state: _delta_rule(q, k, v, beta, state, output_final_state)  # noqa: E731
        return _per_sequence(run, cu_seqlens, (q, k, v, beta), initial_state, output_final_state)
    o, S = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=initial_state,
                                 output_final_state=output_final_state)
    return o.transpose(1, 2), S


def _gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                      state_v_first=False, cu_seqlens=None, use_gate_in_kernel=False, A_log=None, dt_bias=None, **_):
    """chunk_gated_delta_rule / fused_recurrent_gated_delta_rule as fla's GatedDeltaNet calls them: q, k [B, T, H, K],
    v [B, T, HV, V] (HV a multiple of H: value head j reads key head j // (HV / H)), g, beta [B, T, HV] (raw when
    the kernel applies the gate and the sigmoid), states [N, HV, K, V] ([N, HV, V, K] with `state_v_first`); fla's
    naive recurrence."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    dtype = q.dtype
    if use_qk_l2norm_in_kernel:
        q, k = (t * torch.rsqrt(t.float().pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    if use_gate_in_kernel:  # the log decay, in fp32 as the kernel computes it
        g = -A_log.float().exp() * F.softplus(g.float() + (0 if dt_bias is None else dt_bias.float()))
    if use_beta_sigmoid_in_kernel:
        beta = beta.float().sigmoid() * (2 if allow_neg_eigval else 1)
    q, k = (t.repeat_interleave(v.shape[2] // q.shape[2], 2) for t in (q, k))  # [B, T, HV, K]

    def recurrence(q, k, v, g, beta, state):
        state = state.transpose(-1, -2) if state_v_first and state is not None else state  # [N, HV, K, V]
        o, S = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, state, output_final_state)
        return o.to(dtype), (S.transpose(-1, -2) if state_v_first and S is not None else S)

    if cu_seqlens is not None:
        return _per_sequence(recurrence, cu_seqlens, (q, k, v, g, beta), initial_state, output_final_state)
    return recurrence(q, k, v, g, beta, initial_state)


def _causal_conv(weight, bias, activation, x, cache):
    """x [B, T, D] after the W inputs of `cache` [B, D, W] (zeros when None), depthwise `weight` [D, 1, W] ->
    (the activated conv [B, T, D], the last W inputs [B, D, W]: the next call's cache)."""
    W = weight.shape[-1]
    past = x.new_zeros(x.shape[0], x.shape[2], W) if cache is None else cache.to(x.dtype)
    seq = torch.cat([past, x.transpose(1, 2)], -1)  # [B, D, W + T]
    y = F.conv1d(seq[..., 1:], weight, bias, groups=weight.shape[0]).transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), seq[..., -W:].contiguous()


def _fused_conv(x, weight, bias=None, activation=None, **_):
    """fla's causal_conv1d as GatedDeltaNet's fused q|k|v call (no cache, no packing) makes it: weight [D, W]."""
    return _causal_conv(weight.unsqueeze(1), bias, activation, x, None)[0], None


def _short_conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
    """ShortConvolution.forward: (act(conv(x)) + residual [B, T, D], the cache [N, D, W] if output_final_state).
    fla updates a single-token call's cache in place as well; the layers store the returned one, as here."""
    if mask is not None:  # padding positions enter the conv as zeros
        x = x * mask.unsqueeze(-1)
    if cu_seqlens is None:
        y, state = _causal_conv(self.weight, self.bias, self.activation, x, cache)
    else:
        conv = lambda x, c: _causal_conv(self.weight, self.bias, self.activation, x, c)  # noqa: E731
        y, state = _per_sequence(conv, cu_seqlens, (x,), cache, True)
    return (y if residual is None else y + residual), (state if output_final_state else None)


def _rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    x = x if residual is None else x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
    return (y, x) if prenorm else y


def _gated_rms_norm(self, x, g, **_):
    """FusedRMSNormGated: RMSNorm(x) * act(g), act the layer's output gate activation (swish or sigmoid)."""
    gate = torch.sigmoid(g.float()) if self.activation == "sigmoid" else F.silu(g.float())
    return (_rms_norm(self, x).float() * gate).to(x.dtype)


def use_pytorch_references() -> None:
    """Patch fla in this process: its DeltaNet and Gated DeltaNet layers, DeltaNetForCausalLM and
    GatedDeltaNetForCausalLM (forward and cached `generate`) then run on the CPU."""
    import fla  # noqa: F401 - registers delta_net and gated_deltanet with transformers' Auto classes
    import fla.layers.delta_net as fla_delta_net
    import fla.layers.gated_deltanet as fla_gated_deltanet
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution
    from fla.modules.mlp import SwiGLULinear

    fla_delta_net.chunk_delta_rule = fla_delta_net.fused_recurrent_delta_rule = _delta_rule
    fla_gated_deltanet.chunk_gated_delta_rule = fla_gated_deltanet.fused_recurrent_gated_delta_rule = _gated_delta_rule
    fla_gated_deltanet.causal_conv1d = _fused_conv
    ShortConvolution.forward = _short_conv
    RMSNorm.forward = _rms_norm
    FusedRMSNormGated.forward = _gated_rms_norm
    SwiGLULinear.forward = lambda self, x, y, weight, bias: F.linear(F.silu(x) * y, weight, bias)
