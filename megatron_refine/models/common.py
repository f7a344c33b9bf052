"""Pieces the mixers share: fla's MLP width, parameter placement, causal short convolution, fused-projection checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from megatron_refine.kernels.utils import compute_dtype
from megatron_refine.kernels.varlen import prepare_position_ids
from megatron_refine.megatron_compat import split_tensor_factory


def fla_intermediate_size(hidden_size: int, hidden_ratio: float = 4) -> int:
    """fla's default MLP width: 256 * ceil(int(h * hidden_ratio * 2/3) / 256)."""
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


def param_device(config: TransformerConfig) -> torch.device | None:
    """Where a mixer's own parameters live: where megatron-core's parallel linears put theirs (the default
    device with use_cpu_initialization, so `with torch.device("meta")` builds a model without memory)."""
    if config.use_cpu_initialization:
        return None
    return torch.device(torch.cuda.current_device())


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """fla's l2norm over the last dim: x / sqrt(sum(x^2) + 1e-6), in fp32 (fp64 kept)."""
    xf = x.to(compute_dtype(x))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


def l2_norm_lact(x: torch.Tensor) -> torch.Tensor:
    """The LaCT authors' l2_norm over the last dim (their ttt_operation.py): x / (||x|| + 1e-5), in fp32
    (fp64 kept). It differs from fla's where ||x|| is small: 1e-5 is added to the norm, not its square."""
    xf = x.to(compute_dtype(x))
    return (xf / (torch.linalg.vector_norm(xf, dim=-1, keepdim=True) + 1e-5)).to(x.dtype)


_SHORT_CONV_TIME = 16  # up to this many new steps per row the window sum beats F.conv1d (CPU, fwd + bwd)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution over time (fla's ShortConvolution without its activation).

    x [B, T, C], weight [C, W], tail [B, W-1, C]: the inputs before x (zeros when None).
    cu_seqlens [N + 1] (with B = 1): packed sequences; no output reaches back before its sequence's start.
    Returns (y [B, T, C], new tail [B, W-1, C]: the last W-1 inputs, for decoding on; None when packed).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if cu_seqlens is not None and tail is not None:
        raise ValueError("causal_conv1d takes either a decoding tail or cu_seqlens, not both")
    w = weight.to(x.dtype)
    padded = torch.cat([x.new_zeros(B, W - 1, C) if tail is None else tail.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    new_tail = None if cu_seqlens is not None else padded[:, padded.shape[1] - (W - 1) :]
    if cu_seqlens is None and T > _SHORT_CONV_TIME:
        return F.conv1d(padded.transpose(1, 2), w[:, None, :], groups=C).transpose(1, 2), new_tail
    # The weighted sum of the window: exact everywhere, and cheaper than a depthwise conv call (about 0.2 ms of
    # fixed cost on CPU) for short inputs: decoding steps, REFINE's k-token scoring forward. Packed: no input
    # i steps back counts where it lies before the output's sequence start.
    since_start = None if cu_seqlens is None else prepare_position_ids(cu_seqlens, T)[None, :, None]  # [1, T, 1]
    y = x * w[:, W - 1]
    for i in range(1, W):
        term = padded[:, W - 1 - i : W - 1 - i + T] * w[:, W - 1 - i]
        y = y + (term if since_start is None else term * (since_start >= i).to(x.dtype))
    return y, new_tail


def split_fused(sharded_state_dict: dict, key: str, pieces: list[tuple[str, int]], tp: int) -> None:
    """Replace a fused column-parallel tensor by named pieces (each sharded over TP on its own), so a
    checkpoint reshards across TP sizes. `pieces` are (name, global size along dim 0)."""
    sharded_state_dict[key] = split_tensor_factory(
        sharded_state_dict[key], [size // tp for _, size in pieces], [name for name, _ in pieces], 0
    )


def split_fused_into(sharded_state_dict: dict, prefix: str, name: str, pieces: list[tuple[str, int]], tp: int) -> None:
    """As `split_fused`, with each piece saved under a name of its own beside the fused tensor's, not below it:
    `name` is the fused tensor's name in the module at `prefix`, `pieces` are (piece name in that module, global
    size along dim 0). A projection fused from separate ones keeps their checkpoint keys this way (e.g.
    "in_proj.weight" saved as "qkv.weight.query", ..., "lr_proj.weight"), optimizer states' included (the same key
    behind their own prefix)."""
    key = f"{prefix}{name}"
    labels = [str(i) for i in range(len(pieces))]
    factory = split_tensor_factory(sharded_state_dict[key], [size // tp for _, size in pieces], labels, 0)
    build_labelled = factory.build_fn

    def build(fused_key: str, *args, **kwargs):
        if not fused_key.endswith(name):
            raise ValueError(f"{fused_key} is not the checkpoint key of a tensor named {name}")
        module_key = fused_key[: len(fused_key) - len(name)]
        chunks = build_labelled(fused_key, *args, **kwargs)
        for chunk in chunks:  # megatron-core names piece i f"{fused_key}.{i}"
            chunk.key = module_key + pieces[int(chunk.key.rsplit(".", 1)[1])][0]
        return chunks

    sharded_state_dict[key] = replace(factory, build_fn=build)


def mixer_sharded_state_dict(
    module: torch.nn.Module,
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict | None,
    own_tp_axes: dict[str, int],
    child_tp_axes: dict[str, dict[str, int]],
) -> dict:
    """A mixer's sharded state dict: its own parameters with their TP axes (`own_tp_axes`, by name), plain
    children (`child_tp_axes`: child name -> {param: axis}) likewise, and every other child through
    megatron-core. The TP group is passed explicitly: with only the metadata's DP group, megatron-core
    0.16.1 would give replicated tensors (o_norm, ttt_norm) replica id 0 on every TP rank."""
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    groups = dict(tp_group=parallel_state.get_tensor_model_parallel_group(), dp_cp_group=metadata["dp_cp_group"])
    own = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    state = make_sharded_tensors_for_checkpoint(own, prefix, own_tp_axes, sharded_offsets, **groups)
    for name, child in module.named_children():
        if name in child_tp_axes:
            state.update(make_sharded_tensors_for_checkpoint(
                child.state_dict(prefix="", keep_vars=True), f"{prefix}{name}.", child_tp_axes[name],
                sharded_offsets, **groups,
            ))
        else:
            state.update(sharded_state_dict_default(
                child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=groups["tp_group"]
            ))
    return state
