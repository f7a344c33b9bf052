"""Pieces both mixers use: parameter placement, causal short convolution, fused-projection checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.ssm.gated_delta_net import _split_tensor_factory  # names the pieces of a fused weight
from megatron.core.transformer import TransformerConfig


def param_device(config: TransformerConfig) -> torch.device:
    """Where a mixer's own parameters live: where megatron-core's parallel linears put theirs."""
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution over time (fla's ShortConvolution without its activation).

    x [B, T, C], weight [C, W], tail [B, W-1, C]: the inputs before x (zeros when None).
    Returns (y [B, T, C], new tail [B, W-1, C]: the last W-1 inputs, for decoding on).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(B, W - 1, C)
    padded = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    y = F.conv1d(padded.transpose(1, 2), weight[:, None, :].to(x.dtype), groups=C).transpose(1, 2)
    return y, padded[:, padded.shape[1] - (W - 1) :]


def split_fused(sharded_state_dict: dict, key: str, pieces: list[tuple[str, int]], tp: int) -> None:
    """Replace a fused column-parallel tensor by named pieces (each sharded over TP on its own), so a
    checkpoint reshards across TP sizes. `pieces` are (name, global size along dim 0)."""
    sharded_state_dict[key] = _split_tensor_factory(
        sharded_state_dict[key], [size // tp for _, size in pieces], [name for name, _ in pieces], 0
    )
