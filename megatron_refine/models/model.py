"""`FastWeightGPTModel`: megatron-core's GPTModel over a DeltaNet or LaCT stack, with cached decoding and
branch states.

The training forward is GPTModel's own (pipeline stages, sequence parallelism, Megatron schedules); packed
documents come in as megatron-core's `packed_seq_params` (see `packing.py`). Three more entry points, for a
whole model on one pipeline stage:
- `forward_with_branch_states(input_ids)`: the same forward, whose output can then give every layer's
  decoding state after any positions, chosen from its logits, differentiably (REFINE branches its rollouts
  from these): `out.states_after(positions)`;
- `prefill(input_ids)`: the same forward without a graph, giving the logits and decoding state after the last
  token of every row or packed document from the kernels' final states (generation and evaluation);
- `step(input_ids, cache)`: one token for each of N rows, from an `InferenceCache` (the decoder);
- `forward_from_cache(input_ids, cache)`: the training forward over L new tokens per row, each row starting
  from the cache (REFINE scores its rollouts with it; it must agree with the decoder).

Every logit the model makes (GPTModel's forward and loss, the three entry points) is over the tokenizer's
vocabulary: the columns of Megatron's vocabulary padding are -inf (`mask_padded_vocab`).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_refine.models.config import FastWeightConfig
from megatron_refine.models.context_parallel import forward_packing
from megatron_refine.models.inference import (
    BranchRequest,
    ContinueRequest,
    DecodeRequest,
    InferenceCache,
    PrefillRequest,
)
from megatron_refine.models.packing import Packing
from megatron_refine.models.specs import get_block_spec


@dataclass
class BranchOutput:
    logits: torch.Tensor  # [B, T, V/t], vocab-parallel
    hidden: torch.Tensor  # [B, T, h], last layer after the final norm
    readers: dict[int, Callable[[torch.Tensor], Any]]  # layer number -> positions [B, P] -> its cache rows
    packing: Packing | None

    def states_after(self, positions: torch.Tensor) -> InferenceCache:
        """The decoding state after each of positions [B, P] (with packed documents: the state of the position's
        own document): a cache of B * P rows, ordered (b, p), differentiable w.r.t. the forward's inputs."""
        within = positions if self.packing is None else positions - self.packing.document_starts(positions)
        layers = {number: read(positions) for number, read in self.readers.items()}
        return InferenceCache(positions=(within + 1).flatten(), layers=layers)


class FastWeightGPTModel(GPTModel):
    def __init__(
        self,
        config: FastWeightConfig,
        vocab_size: int,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: bool | None = None,
        vp_stage: int | None = None,
    ):
        super().__init__(
            config=config,
            transformer_layer_spec=get_block_spec(config, use_te, vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=config.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=config.tie_word_embeddings,
            position_embedding_type="none",
            vp_stage=vp_stage,
        )
        self.tokenizer_vocab_size = vocab_size
        if self.post_process:  # every logit passes the output layer: the padding leaves the distribution there
            self.output_layer.register_forward_hook(self._mask_padded_logits)
        if self.pre_process and config.pad_token_id is not None:
            self.embedding.register_forward_hook(self._freeze_pad_lookups, with_kwargs=True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """GPTModel's; a hybrid's layers differ, so each is saved under its own number (megatron-core's
        `non_homogeneous_layers` keys, decoder.layers.{i}.*) instead of stacked along a layer axis."""
        if self.config.hybrid_layer_pattern:
            metadata = {**(metadata or {}), "non_homogeneous_layers": True}
        return super().sharded_state_dict(prefix, sharded_offsets, metadata)

    def _freeze_pad_lookups(self, embedding, args, kwargs, output):
        """The embedding [s(/t), b, h] of each pad token detached: its row's gradient comes only from the output
        layer (when tied), as nn.Embedding(padding_idx=pad_token_id) gives HF models."""
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]  # [b, s]
        pad = (ids == self.config.pad_token_id).transpose(0, 1)  # [s, b]
        if self.config.sequence_parallel:  # this rank's part of the sequence
            rank, local = parallel_state.get_tensor_model_parallel_rank(), output.shape[0]
            pad = pad[rank * local : (rank + 1) * local]
        return torch.where(pad[..., None], output.detach(), output)

    def _mask_padded_logits(self, layer, inputs, output):
        logits, bias = output  # [s, b, V/t]
        return mask_padded_vocab(logits, self.tokenizer_vocab_size), bias

    @property
    def mixers(self) -> list[torch.nn.Module]:
        return [layer.self_attention for layer in self.decoder.layers]

    @contextmanager
    def _request(self, request):
        for mixer in self.mixers:
            mixer.request = request
        try:
            yield request
        finally:
            for mixer in self.mixers:
                mixer.request = None

    def _whole_model_forward(self, input_ids: torch.Tensor, packed_seq_params=None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [b, s] -> (vocab-parallel logits [s, b, V/t], final hidden [s, b, h] on every TP rank)."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError(
                "decoding and branch states need the whole model on one pipeline stage: "
                "use pipeline_model_parallel_size=1 for REFINE steps and generation"
            )
        hidden = self.embedding(input_ids=input_ids, position_ids=None)
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, packed_seq_params=packed_seq_params)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return logits, hidden

    def forward_with_branch_states(
        self, input_ids: torch.Tensor, packed_seq_params: PackedSeqParams | None = None
    ) -> BranchOutput:
        """input_ids [B, T] -> logits and hidden states, from which `states_after(positions)` then reads every
        layer's decoding state after any positions: no prefix is run again. What the readers hold is what
        the backward saves anyway (the chunk states), so under grad they cost no extra memory."""
        if isinstance(packed_seq_params, torch.Tensor):
            raise TypeError("forward_with_branch_states takes no positions: choose them after the forward and read "
                            "the states with `out.states_after(positions)`")
        with self._request(BranchRequest()) as request:
            logits, hidden = self._whole_model_forward(input_ids, packed_seq_params)
        packing = forward_packing(packed_seq_params, *input_ids.shape, input_ids.device)
        return BranchOutput(logits.transpose(0, 1), hidden.transpose(0, 1), request.readers, packing)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, packed_seq_params: PackedSeqParams | None = None
                ) -> tuple[torch.Tensor, InferenceCache]:
        """input_ids [B, T] (or one row [1, T] of packed documents) -> (vocab-parallel logits after the last token of
        every sequence [N, V/t], the decoding cache of those N rows): one forward, whose mixers keep only their
        kernels' final states (fla's varlen kernel on CUDA), not the per-position branch states."""
        packing = Packing.from_params(packed_seq_params, *input_ids.shape)
        if packing is not None and input_ids.shape[0] != 1:
            raise ValueError(f"prefill packs documents into one row, got {input_ids.shape[0]} rows: concatenate them")
        with self._request(PrefillRequest()) as request:
            logits, hidden = self._whole_model_forward(input_ids, packed_seq_params)
        B, T = input_ids.shape
        last = (packing.cu_seqlens[1:] - 1)[None] if packing else torch.full((B, 1), T - 1, device=input_ids.device)
        out = BranchOutput(logits.transpose(0, 1), hidden.transpose(0, 1), request.readers, packing)
        b = torch.arange(last.shape[0], device=last.device)[:, None]
        return out.logits[b, last].flatten(0, 1), out.states_after(last)

    def forward_from_cache(self, input_ids: torch.Tensor, cache: InferenceCache) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [N, L] following the cache's N rows -> (vocab-parallel logits [N, L, V/t], hidden [N, L, h]).

        The cache is not changed. Under sequence parallelism L is padded to a multiple of TP at the end
        (causal, so the padding changes nothing before it).
        """
        N, L = input_ids.shape
        if cache.num_rows != N:
            raise ValueError(f"cache has {cache.num_rows} rows, got {N} sequences")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pad = (-L) % tp if self.config.sequence_parallel else 0
        ids = torch.cat([input_ids, input_ids.new_zeros(N, pad)], dim=1) if pad else input_ids
        with self._request(ContinueRequest(cache)):
            logits, hidden = self._whole_model_forward(ids)
        return logits.transpose(0, 1)[:, :L], hidden.transpose(0, 1)[:, :L]

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: input_ids [N] -> (vocab-parallel logits [N, V/t], hidden [N, h]); updates `cache`.

        The rows travel along Megatron's sequence dimension, so under sequence parallelism each TP rank
        embeds N/t of them and the mixers see all N (N must then be a multiple of the TP size).
        """
        N = input_ids.shape[0]
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if self.config.sequence_parallel and N % tp != 0:
            raise ValueError(f"with sequence parallelism the number of decoding rows ({N}) must be a multiple of TP ({tp})")
        if cache.num_rows != N:
            raise ValueError(f"cache has {cache.num_rows} rows, got {N} tokens")
        with self._request(DecodeRequest(cache)):
            logits, hidden = self._whole_model_forward(input_ids.view(1, N))
        cache.positions = cache.positions + 1
        return logits[:, 0], hidden[:, 0]

    def empty_cache(self, rows: int, device: torch.device | None = None) -> InferenceCache:
        """The state before any token (each layer fills its entry on the first step)."""
        device = device or next(self.parameters()).device
        return InferenceCache(positions=torch.zeros(rows, dtype=torch.long, device=device))


def frozen_copy(model: FastWeightGPTModel) -> FastWeightGPTModel:
    """A frozen copy of the model's current weights, e.g. REFINE's KL reference. (copy.deepcopy cannot copy
    a Megatron model: it holds process groups.) Built without initialisation, so no RNG is consumed."""
    config = dataclasses.replace(model.config, perform_initialization=False)
    copy = FastWeightGPTModel(config, model.vocab_size, pre_process=model.pre_process, post_process=model.post_process)
    copy.tokenizer_vocab_size = model.tokenizer_vocab_size
    copy.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return copy.to(device).eval().requires_grad_(False)


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This TP rank's vocabulary slice of logits [..., V/t] with the ids >= vocab_size (Megatron's padding) at
    -inf, in place: every softmax over them is then the real vocabulary's, exactly, and the padding rows of the
    output layer get no gradient. Only the rank(s) whose slice holds padding ids change anything."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        logits.shape[-1], parallel_state.get_tensor_model_parallel_rank(), tp)
    if end > vocab_size:
        logits[..., max(vocab_size - start, 0):] = -torch.inf
    return logits


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron pads the embedding so every TP rank holds an equal shard. The padding does not depend on
    the TP size (unlike Megatron-LM's), so a checkpoint reshards across TP sizes."""
    padded = math.ceil(vocab_size / make_vocab_size_divisible_by) * make_vocab_size_divisible_by
    if padded % tp != 0:
        raise ValueError(
            f"padded vocab size {padded} is not divisible by TP={tp}: set make_vocab_size_divisible_by "
            f"to a multiple of {tp}"
        )
    return padded


def build_model(
    config: FastWeightConfig,
    vocab_size: int,
    *,
    make_vocab_size_divisible_by: int = 128,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_te: bool | None = None,
) -> FastWeightGPTModel:
    """The model for this rank's pipeline stage (pre/post process from Megatron's parallel state).

    `vocab_size` is the tokenizer's; the embedding is padded (see `padded_vocab_size`) and
    `model.tokenizer_vocab_size` keeps the real size (generation never samples the padding).
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    padded = padded_vocab_size(vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size)
    model = FastWeightGPTModel(config, padded, pre_process=pre_process, post_process=post_process, use_te=use_te)
    model.tokenizer_vocab_size = vocab_size
    return model
