"""RMSNorms for the local (non-TE) specs.

`RMSNorm` is the layer norm of the residual stream (input, pre-MLP and final norms). Under sequence
parallelism it sees only this rank's slice of the sequence, so its weight is marked `sequence_parallel`
and Megatron all-reduces its gradient over TP (megatron-core's WrappedTorchNorm refuses SP). It is also
attention's q / k norm (over the head dim), whose gradient megatron-core all-reduces over TP by their names
under `qk_layernorm`. With `layernorm_zero_centered_gamma` (Qwen3-Next / Qwen3.5's norms) the weight is stored
as gamma - 1, starts at zero, and scales by (1 + weight), as TE's `zero_centered_gamma`.

`HeadRMSNorm` normalises each head's output inside a mixer (DeltaNet's o_norm, LaCT's ttt_norm): one
weight of the head dim shared by all heads. Each TP rank holds a subset of the heads, so the weight is
used through `copy_to_tensor_model_parallel_region`: identity forward, all-reduce of its gradient backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.transformer import TransformerConfig

from megatron_refine.kernels.utils import compute_dtype


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """y = x / rms(x) * weight (or * (1 + weight), zero-centered), computed in fp32 (fp64 kept), returned in x's
    dtype."""
    acc = compute_dtype(x)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(acc)
    return (y * (1.0 + w if zero_centered else w)).to(x.dtype)


class RMSNorm(torch.nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)


class HeadRMSNorm(torch.nn.Module):
    """RMSNorm over the last dim of [..., heads, head_dim], optionally gated: norm(x) * silu(gate)."""

    def __init__(self, config: TransformerConfig, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = rms_norm(x, copy_to_tensor_model_parallel_region(self.weight), self.eps)
        if gate is None:
            return y
        acc = compute_dtype(x)
        return (y.to(acc) * F.silu(gate.to(acc))).to(x.dtype)
