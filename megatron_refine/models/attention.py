"""Rotary embeddings, sliding-window causal attention (LaCT's SWA), full-sequence and one step, and full causal
attention (hybrid models' attention layers: `causal_attention`, and `TorchDotProductAttention`, megatron-core's core
attention interface on a CPU).

`sliding_window_attention` runs FlexAttention under a sliding-window block mask on CUDA (only key blocks
inside the window are visited: memory O(T)) and `sliding_window_attention_dense`, SDPA under a boolean mask in
query blocks (memory O(T * (block + window))), everywhere else: the reference, as `use_reference=True` forces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.models.packing import Packing


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


def flex_available(q: torch.Tensor) -> bool:
    """Whether the FlexAttention path takes this input: CUDA, a dtype and head dim (>= 16) its Triton kernel has."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and q.shape[-1] >= 16


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sequence_ids: torch.Tensor | None = None,
    past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    use_reference: bool = False,
) -> torch.Tensor:
    """Causal attention where each query sees itself and the `window - 1` tokens before it. [B, T, H, D].

    sequence_ids [B, T]: packed documents; a query sees only its own document's keys.
    past: (k_window, v_window [B, W-1, H, D], valid [B, W-1]): the keys before the first query (a cache).
    use_reference: force the dense path even where FlexAttention could run.

    Runs `sliding_window_attention_flex` where `flex_available`, else the dense reference. `past` runs dense:
    `forward_from_cache` continues over a few rollout tokens (REFINE's k = 5), so its mask is only
    [T, W-1+T], while FlexAttention would pad the T queries to a 128-row block.
    """
    if past is None and not use_reference and flex_available(q):
        return sliding_window_attention_flex(q, k, v, window, sequence_ids)
    return sliding_window_attention_dense(q, k, v, window, sequence_ids, past)


def sliding_window_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sequence_ids: torch.Tensor | None = None,
    past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The reference: SDPA under a boolean mask, queries in blocks of `block` (default max(1024, window)), each
    against only the keys its window can reach, so memory grows as T * (block + window), not T * T."""
    B, T = q.shape[:2]
    if past is not None and sequence_ids is not None:
        raise ValueError(
            "past and sequence_ids cannot be combined: a continuation from a cache runs one sequence per row"
        )
    P = 0
    if past is not None:
        k_past, v_past, valid = past
        P = k_past.shape[1]
        k, v = torch.cat([k_past.to(k.dtype), k], dim=1), torch.cat([v_past.to(v.dtype), v], dim=1)
        valid = torch.cat([valid, valid.new_ones(B, T)], dim=1)  # [B, P + T]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, ., D]
    block = block or max(1024, window)
    out = []
    for start in range(0, T, block):
        end = min(T, start + block)
        lo = max(0, P + start - window + 1)  # the first key (index into past + new) a query of the block sees
        query_index = torch.arange(start, end, device=q.device)
        key_index = torch.arange(lo, P + end, device=q.device) - P
        distance = query_index[:, None] - key_index[None, :]
        allowed = (distance >= 0) & (distance < window)  # [t, s]
        if sequence_ids is not None:  # [B, t, s]
            allowed = allowed & (sequence_ids[:, start:end, None] == sequence_ids[:, None, lo:end])
        if past is not None:
            allowed = allowed & valid[:, None, lo:P + end]
        mask = allowed if allowed.ndim == 2 else allowed[:, None]
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, lo:P + end], v[:, :, lo:P + end],
                                                  attn_mask=mask))
    return torch.cat(out, dim=2).transpose(1, 2)


# FlexAttention is windowed only when compiled: eager flex_attention materialises the full [T, T] scores and
# eager create_block_mask a dense [B, T, T] mask. torch.compile is lazy: each compiles on its first CUDA call.
_flex_attention_compiled = torch.compile(flex_attention)
_create_block_mask_compiled = torch.compile(create_block_mask)
_last_block_mask: tuple = (None, None)  # (key, BlockMask) of the last call


def _window_mask_mod(window: int, sequence_ids: torch.Tensor | None):
    """mask_mod: key kv_idx is visible from query q_idx (the dense path's `allowed`, without `past`)."""

    def causal_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    if sequence_ids is None:
        return causal_window

    def same_document(b, h, q_idx, kv_idx):
        return causal_window(b, h, q_idx, kv_idx) & (sequence_ids[b, q_idx] == sequence_ids[b, kv_idx])

    return same_document


def sliding_window_block_mask(
    window: int, sequence_ids: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> BlockMask:
    """The sliding-window BlockMask (one per row with `sequence_ids`, else one broadcast over the batch).

    Built once per forward: every layer passes the same `sequence_ids` tensor (`Packing` caches it), so the
    last mask is reused while that very object (held here, so its id is not recycled) and the sizes match.
    """
    global _last_block_mask
    key = (sequence_ids, None if sequence_ids is None else batch, length, window, device)
    last_key, block_mask = _last_block_mask
    if last_key is not None and last_key[0] is sequence_ids and last_key[1:] == key[1:]:
        return block_mask
    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    block_mask = build(_window_mask_mod(window, sequence_ids), key[1], None, length, length, device=device)
    _last_block_mask = key, block_mask
    return block_mask


def sliding_window_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sliding_window_attention_dense` (without `past`) by FlexAttention, visiting only the key blocks in the
    window: memory O(T), time O(T * window). Compiled on CUDA; eager elsewhere, which only the tests run
    (inductor's CPU build takes ~25 s; FlexAttention has no CPU backward, so CPU training runs dense).
    """
    B, T = q.shape[:2]
    block_mask = sliding_window_block_mask(window, sequence_ids, B, T, q.device)
    attend = _flex_attention_compiled if q.is_cuda else flex_attention
    o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)  # [B, H, T, D]
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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sequence_ids: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Causal softmax attention over whole sequences, q [B, T, H, D], k and v [B, T, G, D] with G dividing H
    (grouped-query: query head j reads key head j // (H / G), as megatron-core and transformers).
    sequence_ids [B, T]: packed documents, each attending only inside itself (`sliding_window_attention_dense` with
    a window that reaches every earlier key)."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    if sequence_ids is None:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)
    return sliding_window_attention_dense(q, k, v, q.shape[1], sequence_ids)


def causal_attention_after(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, since: torch.Tensor,
                           *, use_reference: bool = False) -> torch.Tensor:
    """Causal softmax attention of queries q [B, L, H, D] at positions first .. first + L - 1 of rows whose keys and
    values k, v [B, S, G, D] (S >= first + L, grouped as `causal_attention`'s) start at position 0: a context-parallel
    piece's queries over every piece's keys. since [B, L]: each query's position inside its document, so it sees the
    keys from its document's start to itself.

    FlexAttention under a block mask where `flex_available` (CUDA: only the key blocks a query can see are visited,
    memory O(S)), else `causal_attention_after_dense`, the reference (`use_reference` forces it)."""
    if not use_reference and flex_available(q):
        return causal_attention_after_flex(q, k, v, first, since)
    return causal_attention_after_dense(q, k, v, first, since)


def causal_attention_after_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, since: torch.Tensor,
                                 block: int = 1024) -> torch.Tensor:
    """`causal_attention_after` by SDPA under a boolean mask, in blocks of `block` queries, each against the keys up to
    its last query. Its backward keeps each block's mask (as fp32 on a CPU): O(L x S) for the piece, fine at the CPU
    tests' lengths, not at a long document's (the FlexAttention path's is O(S))."""
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, ., D]
    out = []
    for start in range(0, q.shape[2], block):
        end = min(q.shape[2], start + block)
        query = first + torch.arange(start, end, device=q.device)  # [t]
        key = torch.arange(first + end, device=q.device)  # [s]
        allowed = (key <= query[:, None]) & (key >= (query - since[:, start:end])[..., None])  # [B, t, s]
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, : first + end], v[:, :, : first + end],
                                                  attn_mask=allowed[:, None]))
    return torch.cat(out, dim=2).transpose(1, 2)


def causal_attention_after_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, since: torch.Tensor
                                ) -> torch.Tensor:
    """`causal_attention_after` by FlexAttention (compiled on CUDA; eager elsewhere, forward only: the CPU tests)."""
    B, L = q.shape[:2]
    S = first + L
    block_mask = _causal_after_block_mask(first, since, B, L, S, q.device)
    attend = _flex_attention_compiled if q.is_cuda else flex_attention
    o = attend(q.transpose(1, 2), k[:, :S].transpose(1, 2), v[:, :S].transpose(1, 2), block_mask=block_mask,
               enable_gqa=q.shape[2] != k.shape[2])  # [B, H, L, D]
    return o.transpose(1, 2)


_last_causal_after_mask: tuple = (None, None)  # (key, BlockMask) of the last call


def _causal_after_block_mask(first: int, since: torch.Tensor, batch: int, length: int, keys: int,
                             device: torch.device) -> BlockMask:
    """The BlockMask of `causal_attention_after`, built once per forward: every layer passes the same `since` tensor
    (the piece's `Packing.position_ids`), so the last mask is reused while that very object and the sizes match."""
    global _last_causal_after_mask
    key = (since, first, batch, length, keys, device)
    last_key, block_mask = _last_causal_after_mask
    if last_key is not None and last_key[0] is since and last_key[1:] == key[1:]:
        return block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + first
        return (kv_idx <= position) & (kv_idx >= position - since[b, q_idx])

    build = _create_block_mask_compiled if device.type == "cuda" else create_block_mask
    block_mask = build(mask_mod, batch, None, length, keys, device=device)
    _last_causal_after_mask = key, block_mask
    return block_mask


class TorchDotProductAttention(torch.nn.Module):
    """megatron-core's core attention interface (its local `DotProductAttention` allocates on CUDA) in PyTorch:
    causal softmax attention of [s, b, heads, dim] queries over grouped keys and values -> [s, b, heads * dim], with
    packed documents (megatron-core's `packed_seq_params`, models/packing.py) attending only inside themselves."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str = "self", **kwargs):
        super().__init__()  # megatron-core's arguments; causal attention needs none of them

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b = query.shape[:2]
        packing = Packing.from_params(packed_seq_params, b, s)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, ., d]
        o = causal_attention(q, k, v, packing.sequence_ids if packing else None)
        return o.transpose(0, 1).reshape(s, b, -1)
