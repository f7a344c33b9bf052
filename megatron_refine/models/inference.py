"""Inference state of a fast-weight model: per-layer caches, and the requests the model hands its mixers.

A mixer runs in one of five ways, chosen by the request the model sets on it for one call:
- none: the training forward over full sequences;
- `BranchRequest()`: the training forward, and each mixer also leaves in `request.readers` a function of
  positions [B, P] (chosen after the forward) -> its decoding state after them (B * P rows, ordered (b, p)),
  read differentiably from what this forward computed;
- `PrefillRequest()`: the same forward, whose readers give the state after the last token of every sequence
  only (positions [B, 1], or [1, N] for N packed documents), from the kernels' final states (fla's varlen
  kernel on CUDA): what generation and evaluation start decoding from;
- `DecodeRequest(cache)`: one token per row; each mixer reads and replaces its layer's entry in the cache;
- `ContinueRequest(cache)`: the training forward over [N, L] new tokens, each row starting from the cache's
  state (the chunked kernels with initial states, not the decode step). The cache is left as it was.
Every cache tensor has the rows as its first dimension, so caches can be indexed and repeated per row, unless the
layer's cache says otherwise by defining `select(rows)` and `repeat_interleave(n)` itself (an attention layer's
cache shares one forward's keys and values among the rows that branch from it).

Why an attribute (`mixer.request`, set by `FastWeightGPTModel._request` for one call and cleared after), not an
argument: the mixers are called by megatron-core's TransformerBlock and TransformerLayer, whose only inference
argument, `inference_context`, they read themselves as megatron-core's `BaseInferenceContext` (static or dynamic
batching, CUDA graphs, KV offsets); passing a request through them would mean replacing both classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_refine.models.context_parallel import context_parallel_size, forward_packing
from megatron_refine.models.packing import Packing


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every tensor in a (nested) dataclass / tuple / dict, keeping the structure."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    if isinstance(obj, tuple):
        return tuple(map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class InferenceCache:
    """Decoding state of N rows: each layer's cache (by Megatron layer number) and each row's next position."""

    positions: torch.Tensor  # [N], the position the next token will have
    layers: dict[int, Any] = field(default_factory=dict)  # empty before the first token

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    def select(self, rows: torch.Tensor) -> "InferenceCache":
        return self._rows(lambda t: t[rows], lambda cache: cache.select(rows))

    def repeat_interleave(self, n: int) -> "InferenceCache":
        """Each row n times in a row (n rollouts per branch)."""
        return self._rows(lambda t: t.repeat_interleave(n, dim=0), lambda cache: cache.repeat_interleave(n))

    def _rows(self, fn, own) -> "InferenceCache":
        """fn applied to every row-first tensor; a layer cache that defines its own row operations runs `own`."""
        layers = {number: own(cache) if hasattr(cache, "repeat_interleave") else map_tensors(cache, fn)
                  for number, cache in self.layers.items()}
        return InferenceCache(fn(self.positions), layers)

    def detach(self) -> "InferenceCache":
        return map_tensors(self, torch.Tensor.detach)


@dataclass
class BranchRequest:
    readers: dict[int, Callable[[torch.Tensor], Any]] = field(default_factory=dict)  # layer number -> reader


@dataclass
class PrefillRequest:
    readers: dict[int, Callable[[torch.Tensor], Any]] = field(default_factory=dict)  # layer number -> reader


@dataclass
class DecodeRequest:
    cache: InferenceCache


@dataclass
class ContinueRequest:
    cache: InferenceCache


def request_inputs(layer: torch.nn.Module, packed_seq_params, batch: int, length: int, device: torch.device
                   ) -> tuple[Packing | None, Any]:
    """What a mixer's request gives its call over [batch, length] tokens: the documents packed in the rows (none when
    decoding: the rows are sequences; under context parallelism, this rank's piece of the micro-batch, always a
    `Packing`) and its layer's cache when decoding or continuing one (None before the first token)."""
    request = layer.request
    if isinstance(request, DecodeRequest):
        return None, request.cache.layers.get(layer.layer_number)
    if isinstance(request, ContinueRequest):
        if packed_seq_params is not None:
            raise ValueError("a continuation from a cache runs one sequence per row: pass no packed_seq_params")
        return None, request.cache.layers.get(layer.layer_number)
    if isinstance(request, PrefillRequest) and context_parallel_size() > 1:
        raise ValueError("prefill (generation, evaluation) runs whole sequences: use context_parallel_size=1")
    return forward_packing(packed_seq_params, batch, length, device), None


def token_positions(request, packing: Packing | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """[batch, length]: each token's position in its sequence (RoPE's): after the cache's when decoding or continuing
    one, inside its document when packed, else from 0."""
    if isinstance(request, (DecodeRequest, ContinueRequest)):
        return request.cache.positions[:, None] + torch.arange(length, device=device)
    if packing is not None:
        return packing.position_ids
    return torch.arange(length, device=device).expand(batch, length)


def gather_window(
    x: torch.Tensor, positions: torch.Tensor, width: int, starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `width` steps of x [B, T, ...] ending at each position [B, P] -> ([B*P, width, ...], valid [B*P, width]).

    Steps before the start of the sequence (or of the position's document, `starts [B, P]`) are zeros and
    marked invalid.
    """
    B, P = positions.shape
    offsets = torch.arange(width - 1, -1, -1, device=positions.device)  # oldest first
    index = positions[..., None] - offsets  # [B, P, width]
    valid = index >= (0 if starts is None else starts[..., None])
    rows = torch.arange(B, device=positions.device)[:, None, None] * x.shape[1]
    flat = (index.clamp(min=0) + rows).flatten()  # index_select: a cheaper backward than advanced indexing
    window = x.flatten(0, 1).index_select(0, flat).view(B * P, width, *x.shape[2:])
    valid = valid.reshape(B * P, width)
    return window * valid.view(B * P, width, *([1] * (x.ndim - 2))).to(window.dtype), valid
