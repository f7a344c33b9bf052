"""Context parallelism in the model: megatron-core's CP group splits every row of a micro-batch into c contiguous
pieces, rank r holding tokens [r L, (r + 1) L) of each row (L = T / c). Contiguous, not load-balanced as megatron-core's
attention CP is (2c chunks): a fast-weight state runs through the tokens in order, so each piece must follow the one
before it.

What crosses the pieces:
- the fast-weight state: DeltaNet and Gated DeltaNet pass it by the affine transition of each piece
  (`kernels/delta_rule/context_parallel.py`);
- the short convolution's window: each rank reads the last W - 1 inputs of the previous rank's piece
  (`short_conv_piece`);
- attention's keys and values: all-gathered, each query attending to its own document's keys up to itself
  (`models/self_attention.py`);
- the documents: every rank knows the whole micro-batch's document starts, and its piece is a `Packing` of its own
  (`context_piece`): the piece's boundaries, and each row's first token's position inside its document (RoPE, the
  branch readers' windows and the carried state read it).
Only the training and branch forwards run split. Decoding and continuing from a cache run whole rows on one rank: a
branch's state is complete once read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megatron_refine.kernels.varlen import batch_cu_seqlens, cut_cu_seqlens
from megatron_refine.models.common import causal_conv1d
from megatron_refine.models.packing import Packing


def context_parallel_size() -> int:
    return parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def context_piece(params: PackedSeqParams | None, batch: int, length: int, device: torch.device) -> Packing:
    """This rank's piece [batch, length] of the micro-batch [batch, c x length] as a `Packing` (every row one
    document when `params` is None). Kept on the params object: built once per forward, one host read."""
    c, r = context_parallel_size(), parallel_state.get_context_parallel_rank()
    cached = getattr(params, "_piece", None)
    if cached is not None and (cached.batch, cached.length) == (batch, length):
        return cached
    if params is None:
        cu, first = batch_cu_seqlens(batch, length, device), torch.full((batch,), r * length, device=device)
    else:
        whole = Packing.from_params(params, batch, c * length)  # validates the whole micro-batch's starts
        cu, first = cut_cu_seqlens(whole.cu_seqlens, batch, length, c, r)
    piece = Packing(cu, batch, length, first_positions=first)
    if params is not None:
        params._piece = piece
    return piece


def forward_packing(params: PackedSeqParams | None, batch: int, length: int, device: torch.device) -> Packing | None:
    """The documents of a training or branch forward over [batch, length] tokens: this rank's piece under context
    parallelism (always a `Packing`), else the packed documents (None: one sequence a row)."""
    if context_parallel_size() > 1:
        return context_piece(params, batch, length, device)
    return Packing.from_params(params, batch, length)


def short_conv_piece(weight: torch.Tensor, x: torch.Tensor, piece: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """The causal depthwise convolution (weight [C, W]) over this rank's piece x [B, L, C], its first window reaching
    into the previous rank's piece -> (y [B, L, C], the window inputs [B, W - 1 + L, C]: the previous piece's last W - 1
    inputs, zero where they lie in another document, then x; what the branch readers read their conv tails from)."""
    B, L, C = x.shape
    W = weight.shape[-1]
    tail = _PreviousTail.apply(x, W - 1, parallel_state.get_context_parallel_group())  # [B, W - 1, C]
    # tail slot j holds the token W - 1 - j before the piece: in the row's first document if its position reaches back
    reach = torch.arange(W - 1, 0, -1, device=x.device)
    tail = tail * (reach <= piece.first_positions[:, None]).to(x.dtype)[..., None]
    window = torch.cat([tail, x], dim=1)  # [B, W - 1 + L, C]
    # The piece's boundaries in the extended rows: each row's start, and the documents starting inside it, W - 1 later.
    cu = piece.cu_seqlens
    row = torch.div(cu, L, rounding_mode="floor")
    inner = cu - row * L
    cu_window = row * (L + W - 1) + torch.where(inner > 0, inner + W - 1, 0)
    y, _ = causal_conv1d(window.reshape(1, B * (L + W - 1), C), weight, None, cu_window)
    return y.view(B, L + W - 1, C)[:, W - 1:], window


def whole_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's piece x [B, L, ...] -> the whole rows [B, c L, ...] (no graph); x itself without CP."""
    if context_parallel_size() == 1:
        return x
    parts = _all_gather(x.detach().contiguous(), parallel_state.get_context_parallel_group())
    return torch.cat(parts, dim=1)


def gather_pieces(x: torch.Tensor) -> torch.Tensor:
    """Every rank's piece x [B, L, ...] -> the whole rows [B, c L, ...]; the backward reduce-scatters the gradient
    (megatron-core's sequence-parallel gather, over the CP group)."""
    whole = gather_from_sequence_parallel_region(x.transpose(0, 1).contiguous(), True,
                                                 group=parallel_state.get_context_parallel_group())
    return whole.transpose(0, 1)


class _PreviousTail(torch.autograd.Function):
    """x [B, L, C] on every rank of the group -> the last `width` steps of the previous rank's x [B, width, C] (zeros on
    rank 0); the backward sends their gradient back to that rank."""

    @staticmethod
    def forward(ctx, x, width, group):
        ctx.group, ctx.width = group, width
        parts = _all_gather(x[:, x.shape[1] - width:].contiguous(), group)
        r = dist.get_rank(group)
        ctx.length = x.shape[1]
        return parts[r - 1] if r > 0 else torch.zeros_like(parts[0])

    @staticmethod
    def backward(ctx, grad):
        parts = _all_gather(grad.contiguous(), ctx.group)
        r, c = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        d_x = grad.new_zeros(grad.shape[0], ctx.length, *grad.shape[2:])
        if r < c - 1:  # the next rank read this rank's last steps
            d_x[:, ctx.length - ctx.width:] = parts[r + 1]
        return d_x, None, None


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts
