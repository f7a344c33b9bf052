"""Softmax attention layers of hybrid models: megatron-core's `SelfAttention` (its parameters, its per-group
`linear_qkv` layout, q / k layernorm, output gate, checkpoint keys, its core attention: TE's on CUDA), with what our
mixers add: decoding from a key / value cache, branch caches read from one forward, prefill, continuing from a cache,
and packed documents.

Qwen3.5's gated attention is this layer with megatron-core's `attention_output_gate` (the gate rides in
`linear_qkv`: per query group [q heads | gate heads | k | v]), `qk_layernorm` (RMSNorm over the head dim, stored
zero-centered under `layernorm_zero_centered_gamma`), grouped query heads (`num_query_groups`), a head dim of its own
(`kv_channels`) and partial rotary embeddings (`rotary_percent`: the first fraction of each head's dims rotated in
non-interleaved halves, as transformers' `partial_rotary_factor`; base `rotary_base`).

Parallel layout (TP size t): query heads and query groups split across ranks (num_query_groups divisible by t).
    linear_qkv      column-parallel  h -> per query group [q | gate | k | v], groups / t
    q/k_layernorm   one weight of the head dim; megatron-core all-reduces its gradient over TP (qk_layernorm)
    linear_proj     row-parallel     heads * head dim -> h
Under sequence parallelism the input is [s/t, b, h]: linear_qkv gathers the sequence, linear_proj reduce-scatters.

The decoding state is every earlier token's key (after RoPE) and value, so it grows with the sequence. A branch
cache after position p is that same forward's keys and values, of which the branch sees its document's slots up to
p: no prefix is encoded again, and nothing is copied per branch or per rollout (`AttentionCache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_refine.models.attention import (
    TorchDotProductAttention, apply_rope, causal_attention_after, rope_cos_sin)
from megatron_refine.models.context_parallel import gather_pieces
from megatron_refine.models.inference import (
    BranchRequest, ContinueRequest, DecodeRequest, PrefillRequest, request_inputs, token_positions)
from megatron_refine.models.mixers import MixerSpec
from megatron_refine.models.packing import Packing

if TYPE_CHECKING:  # the config inherits AttentionFields through the mixer table
    from megatron_refine.models.config import FastWeightConfig


@dataclass
class AttentionFields:
    """The rotary embedding of attention layers, in megatron-core GPTModel's argument names. The rest of the layout
    is TransformerConfig's own: num_attention_heads, num_query_groups, kv_channels, qk_layernorm,
    attention_output_gate, layernorm_zero_centered_gamma."""

    rotary_base: float = 10000.0
    rotary_percent: float = 1.0


@dataclass
class AttentionCache:
    """One attention layer's decoding state for N rows (this TP rank's query groups): a prefix of keys and values
    shared by the rows (the rows of one forward, which every branch after a position of it reads: nothing is copied
    per branch or per rollout), the slots of it each row sees, and the tokens each row decoded after it."""

    prefix_key: torch.Tensor  # [S, T, G/t, D]: one forward's keys (after RoPE) of S rows; not indexed by cache row
    prefix_value: torch.Tensor  # [S, T, G/t, D]
    source: torch.Tensor  # [N]: the prefix row each cache row reads
    start: torch.Tensor  # [N]: its first prefix slot (its document's start)
    end: torch.Tensor  # [N]: one past its last prefix slot (its branch position + 1)
    key: torch.Tensor  # [N, L, G/t, D]: the tokens it decoded after the prefix
    value: torch.Tensor  # [N, L, G/t, D]
    # m when cache rows i*m .. (i+1)*m - 1 all read prefix row i (REFINE's branches and their rollouts): attention
    # then reads the prefix without gathering it per row. None after an arbitrary `select` (except with one prefix
    # row, packed documents, which every row reads).
    rows_per_source: int | None

    def select(self, rows: torch.Tensor) -> AttentionCache:
        return replace(self, source=self.source[rows], start=self.start[rows], end=self.end[rows],
                       key=self.key[rows], value=self.value[rows], rows_per_source=None)

    def repeat_interleave(self, n: int) -> AttentionCache:
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return replace(self, source=rep(self.source), start=rep(self.start), end=rep(self.end), key=rep(self.key),
                       value=rep(self.value), rows_per_source=self.rows_per_source and self.rows_per_source * n)

    def appended(self, k: torch.Tensor, v: torch.Tensor) -> AttentionCache:
        """With one more decoded token per row (k, v [N, 1, G/t, D])."""
        return replace(self, key=torch.cat([self.key, k.to(self.key.dtype)], dim=1),
                       value=torch.cat([self.value, v.to(self.value.dtype)], dim=1))


def empty_attention_cache(k: torch.Tensor, v: torch.Tensor) -> AttentionCache:
    """The cache of N rows before any token, shaped after this step's k, v [N, ., G/t, D]."""
    N, device = k.shape[0], k.device
    zeros = torch.zeros(N, dtype=torch.long, device=device)
    none = k.new_zeros(N, 0, *k.shape[2:])
    return AttentionCache(none, none, torch.arange(N, device=device), zeros, zeros, none, none, 1)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
    """Causal attention of L new tokens per row after a cache: q [N, L, H, D], k, v [N, L, G, D] (after RoPE) ->
    [N, L, H, D]. Each query sees its row's prefix slots [start, end), the row's decoded tokens, and the new tokens up
    to itself: one softmax over all of them, in fp32 (fp64 kept), the products in the inputs' dtype as a flash
    kernel's. Grouped query heads read their key head without repeating it, and the prefix is read per source row,
    not gathered per cache row, when the rows come in groups (`rows_per_source`)."""
    N, L, H, D = q.shape
    G = k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = D ** -0.5
    qg = q.view(N, L, G, H // G, D).permute(0, 2, 3, 1, 4)  # [N, G, H/G, L, D]
    # The decoded tokens and the new ones, causal among the new: scores [N, G, H/G, L, L' + L].
    new_k, new_v = torch.cat([cache.key.to(k.dtype), k], dim=1), torch.cat([cache.value.to(v.dtype), v], dim=1)
    decoded = cache.key.shape[1]
    s_new = torch.einsum("ngjld,nsgd->ngjls", qg, new_k).to(acc) * scale
    causal = torch.arange(decoded + L, device=q.device) <= decoded + torch.arange(L, device=q.device)[:, None]
    s_new = s_new.masked_fill(~causal, -torch.inf)
    # The prefix: scores [N, G, H/G, L, T], masked outside each row's [start, end).
    T, m = cache.prefix_key.shape[1], cache.rows_per_source
    if cache.prefix_key.shape[0] == 1:  # one prefix row (packed documents): every row reads it, however selected
        m = N
    prefix_key, prefix_value = cache.prefix_key.to(k.dtype), cache.prefix_value.to(v.dtype)
    if not m:  # rows in no known grouping: each row's prefix gathered, [N, T, G, D]
        prefix_key, prefix_value, m = prefix_key[cache.source], prefix_value[cache.source], 1
    S = N // m  # rows i*m .. (i+1)*m - 1 read prefix row i
    s_pre = torch.einsum("smgjld,stgd->smgjlt", qg.view(S, m, G, H // G, L, D), prefix_key)
    s_pre = s_pre.reshape(N, G, H // G, L, T)
    slots = torch.arange(T, device=q.device)
    seen = (slots >= cache.start[:, None]) & (slots < cache.end[:, None])  # [N, T]
    s_pre = (s_pre.to(acc) * scale).masked_fill(~seen[:, None, None, None, :], -torch.inf)
    p = torch.softmax(torch.cat([s_pre, s_new], dim=-1), dim=-1).to(v.dtype)
    p_pre, p_new = p.split([T, decoded + L], dim=-1)
    o = torch.einsum("ngjls,nsgd->ngjld", p_new, new_v)
    o = o + torch.einsum("smgjlt,stgd->smgjld", p_pre.reshape(S, m, G, H // G, L, T), prefix_value).reshape(o.shape)
    return o.permute(0, 3, 1, 2, 4).reshape(N, L, H, D)


def attention_branch_row_bytes(config: FastWeightConfig, context: int, k: int) -> float:
    """What a branch row's scoring forward over its k rollout tokens keeps for its backward in an attention layer,
    at TP=1: its probabilities over the (up to) `context` prefix slots it reads and its k tokens, fp32 (the softmax's
    output) and the bf16 copy the value product keeps; its bf16 queries and output (counted with saved-tensor hooks
    on a CPU). The prefix keys and values are the forward's own (`attention_branch_bytes`)."""
    heads = config.num_attention_heads
    return 6 * heads * k * (context + k) + 2 * 2 * k * heads * head_dim(config)


class AttentionMixer(SelfAttention):
    """[s(/t), b, h] -> ([s(/t), b, h], bias); its decoding cache is an `AttentionCache`."""

    def __init__(self, config: FastWeightConfig, submodules: SelfAttentionSubmodules, layer_number: int | None = None,
                 **kwargs):
        if not config.qk_layernorm:
            submodules = replace(submodules, q_layernorm=None, k_layernorm=None)
        # TransformerLayer's own arguments (process groups, CP communication type, ...) go to megatron-core's layer
        super().__init__(config, submodules, layer_number=layer_number, attn_mask_type=AttnMaskType.causal, **kwargs)
        self.rotary_dim = rotary_dim(config)
        # The model sets it for one call (why not an argument: models/inference.py)
        self.request: BranchRequest | PrefillRequest | DecodeRequest | ContinueRequest | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, packed_seq_params=None, **kwargs):
        """[s(/t), b, h] -> ([s(/t), b, h], bias). In decoding the rows are the sequence dim: [N(/t), 1, h].

        `packed_seq_params` (document starts, see models/packing.py) restarts attention and the RoPE positions at
        every document.
        """
        cfg, request = self.config, self.request
        decoding = isinstance(request, DecodeRequest)
        q, k, v, *gate = self.get_query_key_value_tensors(hidden_states, None, output_gate=cfg.attention_output_gate)
        # [s, b, heads / t, D] each; decoding: [N, 1, .] already has the rows first
        q, k, v = (t if decoding else t.transpose(0, 1) for t in (q, k, v))  # [B, T, ., D]
        B, T = q.shape[:2]
        packing, cache = request_inputs(self, packed_seq_params, B, T, q.device)
        continuing = isinstance(request, ContinueRequest)
        positions = token_positions(request, packing, B, T, q.device)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, cfg.rotary_base)  # [B, T, 1, rotary dims]
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)

        if decoding or continuing:
            cache = cache if cache is not None else empty_attention_cache(k, v)
            o = cached_attention(q, k, v, cache)  # [N, T, heads / t, D]
            if decoding:
                request.cache.layers[self.layer_number] = cache.appended(k, v)
            o = o.reshape(B, T, -1) if decoding else o.transpose(0, 1).reshape(T, B, -1)
        else:
            first = 0
            if packing is not None and packing.first_positions is not None:  # a context-parallel piece
                first = parallel_state.get_context_parallel_rank() * T
                k, v = (gather_pieces(t) for t in (k, v))  # [B, c T, G/t, D]: every piece's
                o = causal_attention_after(q, k, v, first, packing.position_ids).transpose(0, 1).reshape(T, B, -1)
            else:
                o = self._core_attention(q, k, v, packing, packed_seq_params)  # [T, B, heads / t * D]
            if isinstance(request, (BranchRequest, PrefillRequest)):
                request.readers[self.layer_number] = functools.partial(_cache_after, k, v, packing, first)
        if gate:  # megatron-core's output gate, its math (its `_apply_output_gate` is torch.compile'd: a recompile
            # for every new decoding shape)
            o = (o * torch.sigmoid(gate[0].reshape(o.shape).float())).to(o.dtype)
        return self.linear_proj(o)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first `rotary_dim` dims of each head of x [B, T, heads, D]."""
        if self.rotary_dim == x.shape[-1]:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., : self.rotary_dim], cos, sin), x[..., self.rotary_dim :]], dim=-1)

    def _core_attention(self, q, k, v, packing: Packing | None, params) -> torch.Tensor:
        """The training forward's attention through megatron-core's core attention module -> [T, B, heads / t * D].
        Ours reads our packing from the params; TE's takes packed documents in its THD layout: every row's tokens in
        one sequence, the documents (row starts included) as its cu_seqlens."""
        B, T = q.shape[:2]
        if isinstance(self.core_attention, TorchDotProductAttention):
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            return self.core_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=params)
        if packing is None:
            q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))
            return self.core_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal)
        q, k, v = (t.reshape(B * T, *t.shape[2:]) for t in (q, k, v))
        o = self.core_attention(q, k, v, None, attn_mask_type=AttnMaskType.causal,
                                packed_seq_params=packing.thd_params)
        return o.view(B, T, -1).transpose(0, 1)


def _cache_after(k: torch.Tensor, v: torch.Tensor, packing: Packing | None, first: int, positions: torch.Tensor
                 ) -> AttentionCache:
    """An attention layer's decoding cache after positions [B, P] (B * P rows, ordered (b, p)), read from its
    training forward: its keys (after RoPE) and values [B, S, G/t, D] themselves, each branch seeing the slots of its
    position's document up to the position. Under context parallelism k and v are every piece's and the positions
    this rank's piece's, which starts at slot `first`."""
    B, P = positions.shape
    starts = packing.document_starts(positions) if packing else torch.zeros_like(positions)
    source = torch.arange(B, device=positions.device).repeat_interleave(P)
    none = k.new_zeros(B * P, 0, *k.shape[2:])
    return AttentionCache(k, v, source, (first + starts).flatten(), (first + positions + 1).flatten(), none, none, P)


# The config checks run before TransformerConfig.__post_init__ fills kv_channels and num_query_groups in: their
# defaults (hidden / heads, heads) here.
def rotary_dim(config: FastWeightConfig) -> int:
    """How many dims of each head RoPE rotates: transformers' int(head_dim * partial_rotary_factor)."""
    return int(head_dim(config) * config.rotary_percent)


def head_dim(config: FastWeightConfig) -> int:
    return config.kv_channels or config.hidden_size // config.num_attention_heads


def query_groups(config: FastWeightConfig) -> int:
    return config.num_query_groups or config.num_attention_heads


def check_attention_config(config: FastWeightConfig) -> None:
    c, heads, groups, tp = config, config.num_attention_heads, query_groups(config), config.tensor_model_parallel_size
    if heads % groups != 0:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups})")
    if groups % tp != 0:
        raise ValueError(f"num_query_groups ({groups}) must be divisible by tensor_model_parallel_size ({tp}): use a "
                         f"TP size that divides {groups}")
    if c.kv_channels is None and c.hidden_size % heads != 0:
        raise ValueError(f"hidden_size ({c.hidden_size}) is not a multiple of num_attention_heads ({heads}): set "
                         "kv_channels (the attention head dim)")
    if not 0 < c.rotary_percent <= 1 or rotary_dim(c) % 2 != 0:
        raise ValueError(f"rotary_percent ({c.rotary_percent}) must be in (0, 1] and rotate an even number of the head "
                         f"dim's {head_dim(c)} dims")


def attention_parameter_count(config: FastWeightConfig) -> int:
    c, D = config, head_dim(config)
    q = c.num_attention_heads * D
    return c.hidden_size * (q * (2 if c.attention_output_gate else 1) + 2 * query_groups(c) * D) + q * c.hidden_size \
        + 2 * D * c.qk_layernorm


def attention_cache_values(config: FastWeightConfig) -> int:
    """What the decoding cache grows by per token of context: one key and one value per query group."""
    return 2 * query_groups(config) * head_dim(config)


def attention_activation_bytes(config: FastWeightConfig) -> float:
    """A flash-attention kernel (TE's on CUDA) keeps per token, bf16: the norm and linear_qkv inputs, linear_qkv's
    output, q and k after their norms and RoPE, the attention output, its fp32 log-sum-exp per head, the gated
    product (linear_proj's input). An estimate from the tensors kept, not measured."""
    c, D, heads = config, head_dim(config), config.num_attention_heads
    qkv = heads * D * (2 if c.attention_output_gate else 1) + 2 * query_groups(c) * D
    return 2 * (2 * c.hidden_size + qkv + (heads + query_groups(c)) * D + 2 * heads * D) + 4 * heads


def attention_branch_bytes(config: FastWeightConfig) -> float:
    """Per token of the forward: the scoring forward's backward keeps one copy of the prefix keys and values in its
    batched product's layout (bf16), one per micro-batch row, not per branch (counted with saved-tensor hooks on a CPU,
    with the probabilities of `attention_branch_row_bytes`). The branch caches themselves are the forward's own
    keys and values, which its backward keeps anyway."""
    return 2.0 * attention_cache_values(config)


# The text models of Qwen3.5's dense checkpoints (their vocabulary: 248,320 tokens): layers, hidden, attention heads,
# key / value heads, Gated DeltaNet value heads, MLP width, tied embeddings. Read from published launch scripts of
# these checkpoints (slime / miles `scripts/models/qwen3.5-*.sh`: the attention and MLP layout) and config.json files
# of their fine-tunes (the Gated DeltaNet heads), not from Qwen's own config.json; the 2B's layer shapes give
# 1,881,825,088 text parameters, the sum read from its safetensors headers.
QWEN3_5_TEXT = {
    "0p8b": (24, 1024, 8, 2, 16, 3584, True),
    "2b": (24, 2048, 8, 2, 16, 6144, True),
    "4b": (32, 2560, 16, 4, 32, 9216, True),
    "9b": (32, 4096, 16, 4, 32, 12288, False),
}


def _qwen3_5_text(layers: int, hidden: int, heads: int, groups: int, value_heads: int, ffn: int, tied: bool) -> dict:
    """Qwen3.5's layout: three Gated DeltaNet layers to one gated-attention layer (head dim 256, a quarter of it
    rotated, base 1e7), 16 Gated DeltaNet key heads of 128 channels, zero-centered norms."""
    return dict(
        hybrid_layer_pattern="GGG*" * (layers // 4), num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=256, qk_layernorm=True, attention_output_gate=True, rotary_percent=0.25,
        rotary_base=1e7, layernorm_zero_centered_gamma=True, linear_num_key_heads=16,
        linear_num_value_heads=value_heads, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, ffn_hidden_size=ffn, tie_word_embeddings=tied, max_position_embeddings=262144,
    )


PRESETS = {
    # A plain attention model (a transformer with RoPE), so the model tests cover the attention mixer alone.
    "attention_tiny": dict(
        mixer="attention", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
        qk_layernorm=True, attention_output_gate=True, rotary_percent=0.5, ffn_hidden_size=128,
    ),
    # A hybrid in Qwen3.5's conventions (gated attention, zero-centered norms, partial rotary 0.25, Gated DeltaNet with
    # two value heads per key head), attention between and after Gated DeltaNet layers.
    "hybrid_tiny": dict(
        hybrid_layer_pattern="G*G*", num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, qk_layernorm=True, attention_output_gate=True, rotary_percent=0.25, rotary_base=10000.0,
        layernorm_zero_centered_gamma=True, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, delta_rule_chunk_size=16, ffn_hidden_size=128,
    ),
    **{f"qwen3_5_{size}": _qwen3_5_text(*layout) for size, layout in QWEN3_5_TEXT.items()},
}

MIXER = MixerSpec(
    name="attention",
    symbol="*",
    module_spec=lambda backend: ModuleSpec(
        module=AttentionMixer,
        submodules=SelfAttentionSubmodules(linear_qkv=backend.column, core_attention=backend.core_attention,
                                           linear_proj=backend.row, q_layernorm=backend.norm,
                                           k_layernorm=backend.norm)),
    check_config=check_attention_config,
    parameter_count=attention_parameter_count,
    activation_bytes=attention_activation_bytes,
    branch_bytes=attention_branch_bytes,
    state_values=lambda config: 0,
    hf_module=None,
    config_fields=AttentionFields,
    presets=PRESETS,
    cache_values=attention_cache_values,
    branch_row_bytes=attention_branch_row_bytes,
)
