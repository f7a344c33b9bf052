"""Rotary embeddings and sliding-window causal attention (LaCT's SWA), full-sequence and one step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_refine.kernels.utils import compute_dtype


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., 1, dim] for integer positions [...] (non-interleaved halves, as fla and HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    freqs = positions.double()[..., None] * inv_freq  # [..., dim/2]; fp64 so long positions stay exact
    emb = torch.cat([freqs, freqs], dim=-1)[..., None, :]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., H, D] rotated by position; computed in fp32 (fp64 kept)."""
    xf = x.to(compute_dtype(x))
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos.to(xf.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(xf.dtype)).to(x.dtype)


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sequence_ids: torch.Tensor | None = None,
    past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention where each query sees itself and the `window - 1` tokens before it. [B, T, H, D].

    sequence_ids [B, T]: packed documents; a query sees only its own document's keys.
    past: (k_window, v_window [B, W-1, H, D], valid [B, W-1]): the keys before the first query (a cache).
    """
    B, T = q.shape[:2]
    query_index = torch.arange(T, device=q.device)
    key_index = query_index
    if past is not None:
        k_past, v_past, valid = past
        k, v = torch.cat([k_past.to(k.dtype), k], dim=1), torch.cat([v_past.to(v.dtype), v], dim=1)
        key_index = torch.arange(-k_past.shape[1], T, device=q.device)
    distance = query_index[:, None] - key_index[None, :]
    allowed = (distance >= 0) & (distance < window)  # [T, S]
    if sequence_ids is not None:
        allowed = allowed & (sequence_ids[:, :, None] == sequence_ids[:, None, :])  # [B, T, T]
    if past is not None:
        allowed = allowed & torch.cat([valid, valid.new_ones(B, T)], dim=1)[:, None, :]  # [B, T, S]
    mask = allowed if allowed.ndim == 2 else allowed[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return o.transpose(1, 2)


def window_attention_step(
    q: torch.Tensor,  # [N, H, D]
    k: torch.Tensor,  # [N, H, D]
    v: torch.Tensor,
    k_window: torch.Tensor,  # [N, W-1, H, D], the previous tokens' keys (oldest first)
    v_window: torch.Tensor,
    valid: torch.Tensor,  # [N, W-1]
) -> torch.Tensor:
    keys = torch.cat([k_window, k[:, None]], dim=1).transpose(1, 2)  # [N, H, W, D]
    values = torch.cat([v_window, v[:, None]], dim=1).transpose(1, 2)
    mask = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)[:, None, None, :]  # [N, 1, 1, W]
    o = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask)  # [N, H, 1, D]
    return o[:, :, 0]
