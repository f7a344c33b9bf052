"""Hybrid models' attention layers (models/self_attention.py): the forward is megatron-core SelfAttention's own (same
parameters, gated attention, q / k norms, grouped heads, partial RoPE); attention from a cache of shared prefix keys
equals attention over the explicit sequences; zero-centered norms are transformers' Qwen3.5 convention."""

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron_modules import tiny_fast_weight_model, token_batch

from megatron_refine.models import get_layer_spec
from megatron_refine.models.attention import causal_attention
from megatron_refine.models.inference import InferenceCache
from megatron_refine.models.norm import RMSNorm
from megatron_refine.models.self_attention import _cache_after, cached_attention
from megatron_refine.runtime import initialize, spawn


def _equals_megatron_core():
    initialize(seed=0, device="cpu")
    model = tiny_fast_weight_model("hybrid_tiny", params_dtype=torch.float64)
    ours = model.decoder.layers[1].self_attention  # "G*G*": layer 2 is attention
    c = ours.config
    spec = get_layer_spec("attention").submodules.self_attention
    theirs = SelfAttention(c, spec.submodules, layer_number=2, attn_mask_type=AttnMaskType.causal).double()
    theirs.load_state_dict(ours.state_dict())
    T, B = 12, 3
    x = torch.randn(T, B, c.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # megatron-core's rotary input: [T, 1, 1, rotary dims] angles, each frequency twice (non-interleaved halves)
    rot = ours.rotary_dim
    inv_freq = 1.0 / c.rotary_base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
    want, _ = theirs(x, None, rotary_pos_emb=(emb, emb))
    got, _ = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    return c.attention_output_gate and c.qk_layernorm and c.num_query_groups < c.num_attention_heads and rot < c.kv_channels


def test_the_forward_is_megatron_core_self_attentions():
    assert spawn(_equals_megatron_core, 1)[0]


def test_cached_attention_from_shared_prefix_keys_equals_attention_over_each_sequence():
    g = torch.Generator().manual_seed(0)
    B, T, H, G, D, L = 2, 10, 4, 2, 8, 3
    k, v = (torch.randn(B, T, G, D, dtype=torch.float64, generator=g) for _ in range(2))
    positions = torch.tensor([[2, 7], [0, 9]])
    cache = _cache_after(k, v, None, 0, positions)  # 4 rows, 2 per prefix row
    n = 2
    cache = InferenceCache(positions.flatten() + 1, {1: cache}).repeat_interleave(n).layers[1]  # rollouts
    assert cache.rows_per_source == 4
    R = B * positions.shape[1] * n
    q_new = torch.randn(R, L, H, D, dtype=torch.float64, generator=g)
    k_new, v_new = (torch.randn(R, L, G, D, dtype=torch.float64, generator=g) for _ in range(2))
    grouped = cached_attention(q_new, k_new, v_new, cache)
    gathered = cached_attention(q_new, k_new, v_new, cache.select(torch.arange(R)))  # the per-row gather path
    torch.testing.assert_close(gathered, grouped, rtol=1e-12, atol=1e-12)
    # Explicitly: each row's prefix (up to its position) then its L new tokens, under plain causal attention.
    rows = [(b, p) for b in range(B) for p in positions[b].tolist() for _ in range(n)]
    for r, (b, p) in enumerate(rows):
        keys, values = torch.cat([k[b, : p + 1], k_new[r]])[None], torch.cat([v[b, : p + 1], v_new[r]])[None]
        queries = torch.cat([torch.zeros(p + 1, H, D, dtype=torch.float64), q_new[r]])[None]
        want = causal_attention(queries, keys, values)[0, p + 1 :]
        torch.testing.assert_close(grouped[r], want, rtol=1e-12, atol=1e-12)
    # One prefix row (packed documents): every row reads it, selected or not.
    one = InferenceCache(positions[:1].flatten() + 1, {1: _cache_after(k[:1], v[:1], None, 0, positions[:1])})
    one = one.repeat_interleave(n).layers[1]
    rows_one = positions.shape[1] * n
    torch.testing.assert_close(cached_attention(q_new[:rows_one], k_new[:rows_one], v_new[:rows_one],
                                                one.select(torch.arange(rows_one))), grouped[:rows_one], rtol=1e-12,
                               atol=1e-12)
    # Decoding one more token appends it per row; the shared prefix is not copied.
    longer = cache.appended(k_new[:, :1], v_new[:, :1])
    assert longer.prefix_key is cache.prefix_key and longer.key.shape[1] == 1


def test_zero_centered_rms_norm_is_qwen3_5s():
    import sys

    sys.modules.setdefault("fla", None)  # transformers' PyTorch paths
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    from megatron_refine.models import get_config

    config = get_config("hybrid_tiny")
    ours, theirs = RMSNorm(config, 16, eps=1e-6), Qwen3_5RMSNorm(16, eps=1e-6)
    assert ours.weight.abs().max() == 0  # stored as gamma - 1: starts at zero, as transformers' does
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def _any_mix_decodes_and_branches():
    initialize(seed=1, device="cpu")
    # DeltaNet, attention, LaCT, attention: every kind of decoding cache in one model
    model = tiny_fast_weight_model("hybrid_tiny", hybrid_layer_pattern="N*L*", num_lact_heads=2, lact_chunk_size=16,
                                   window_size=12, w0_w2_low_rank=4)
    ids = token_batch(2, 40)
    positions = torch.tensor([[3, 15, 30], [0, 12, 31]])
    rows = [(b, p) for b in range(2) for p in positions[b].tolist()]
    with torch.no_grad():
        logits = model(ids, None, None)
        cache = model.empty_cache(2)
        decoded = torch.stack([model.step(ids[:, t], cache)[0] for t in range(ids.shape[1])], dim=1)
        out = model.forward_with_branch_states(ids)
        continued, _ = model.forward_from_cache(torch.stack([ids[b, p + 1 : p + 6] for b, p in rows]),
                                                out.states_after(positions))
    torch.testing.assert_close(decoded, logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(continued, torch.stack([logits[b, p + 1 : p + 6] for b, p in rows]), atol=2e-5, rtol=1e-4)
    return [type(m).__name__ for m in model.mixers]


def test_any_mix_of_the_tables_mixers_decodes_as_its_forward_and_branches():
    assert spawn(_any_mix_decodes_and_branches, 1)[0] == ["DeltaNetMixer", "AttentionMixer", "LaCTMixer", "AttentionMixer"]
