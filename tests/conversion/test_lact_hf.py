"""LaCT <-> the authors' Hugging Face `lact_swiglu` format: round trips are bitwise (TP=1 and TP=2 + SP), the
export carries the authors' tensor names, shapes and config fields, our shipped modeling code (loaded through
transformers with trust_remote_code) gives the Megatron model's logits and greedy tokens, its cached decoding
equals re-running the prefix, an authors'-style checkpoint imports and fine-tunes, and bad inputs are named."""

import json

import pytest
import torch
from test_deltanet_hf import (
    _logits, _megatron_model, _train, _train_config, assert_round_trip_bitwise, finetune_and_export)

from megatron_refine.conversion import export_to_hf, import_from_hf
from megatron_refine.runtime import initialize, spawn


def authors_keys(config: dict) -> dict[str, tuple]:
    """Every tensor LaCTForCausalLM of the authors saves and its shape, written out from
    ../shared/specs/architectures.md and their layer's definitions (not from our code)."""
    h, H, A = config["hidden_size"], config["num_lact_heads"], config["num_attn_heads"]
    d = h // H
    d_h, inter, vocab = int(d * config.get("inter_multi", 1)), config["intermediate_size"], config["vocab_size"]
    rank = config.get("w0_w2_low_rank", -1)
    assert h % A == 0
    layer = {"attn_norm.weight": (h,), "attn.qkv.weight": (3 * h, h), "attn.o_proj.weight": (h, h),
             "attn.w1": (H, d, d_h), "attn.lr_proj.weight": (3 * H, h), "attn.lr_proj.bias": (3 * H,),
             "attn.qk_scale": (h, 2), "attn.qk_offset": (h, 2), "attn.ttt_scale_proj.weight": (H, h),
             "attn.ttt_scale_proj.bias": (H,), "attn.ttt_norm.weight": (d,), "attn.momentum_proj.0.weight": (H, h),
             "attn.momentum_proj.0.bias": (H,), "mlp_norm.weight": (h,), "mlp.gate_proj.weight": (inter, h),
             "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    for w in ("w0", "w2"):
        layer.update({f"attn.{w}.w_left": (H, d_h, rank), f"attn.{w}.w_right": (H, rank, d)} if rank > 0
                     else {f"attn.{w}": (H, d_h, d)})
    keys = {"model.embeddings.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return keys | {f"model.layers.{i}.{k}": s for i in range(config["num_hidden_layers"]) for k, s in layer.items()}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


def _megatron_greedy(model, prompts, n):
    from megatron_refine.models.generation import generate

    return generate(model, prompts, n, greedy=True)


def _assert_hf_matches(hf_dir, model, vocab, atol=1e-4):
    """The shipped code's logits equal the Megatron model's (lengths across chunk and window edges), and greedy
    generation through transformers, cached and uncached, equals the Megatron cached decoder's."""
    hf = _hf_model(hf_dir)
    assert type(hf).__name__ == "LaCTForCausalLM" and type(hf).__module__.endswith("modeling_lact_swiglu")
    for T in (5, 16, 40):  # inside the first chunk, exactly one chunk, past two chunks and the window
        tokens = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected = hf(tokens, use_cache=False).logits
        torch.testing.assert_close(_logits(model, tokens), expected, atol=atol, rtol=1e-4)
    prompts = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    new = 24  # decoding crosses chunk boundaries (16, 32) and slides the window
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    lengths = []  # the tokens each model forward reads: with the cache, the prompt once, then one a step
    hook = hf.model.register_forward_pre_hook(lambda _, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                              with_kwargs=True)
    cached = hf.generate(prompts, use_cache=True, **kwargs)[:, 13:]
    hook.remove()
    assert lengths == [13] + [1] * (new - 1)
    uncached = hf.generate(prompts, use_cache=False, **kwargs)[:, 13:]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _megatron_greedy(model, prompts, new))


def _export_round_trip(root, tmp, max_shard_bytes):
    initialize(device="cpu")
    files = export_to_hf(root, tmp / "hf", max_shard_bytes=max_shard_bytes)
    assert {"configuration_lact_swiglu.py", "modeling_lact_swiglu.py", "config.json"} <= set(files)
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert config["model_type"] == "lact_swiglu" and config["architectures"] == ["LaCTForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lact_swiglu.LaCTForCausalLM"
    assert {k: config[k] for k in ("ttt_norm_eps", "ttt_l2_norm", "w0_w2_low_rank", "window_size")} == {
        "ttt_norm_eps": 1e-5, "ttt_l2_norm": "lact", "w0_w2_low_rank": 4, "window_size": 12}
    from safetensors import safe_open

    names = sorted((tmp / "hf").glob("*.safetensors"))
    shapes = {}
    for path in names:
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    assert shapes == authors_keys(config)

    source = assert_round_trip_bitwise(root, tmp / "hf", tmp / "back")
    _assert_hf_matches(tmp / "hf", source, source.tokenizer_vocab_size)


@pytest.mark.parametrize("layout", ["tp1", "tp2-sp"])
def test_megatron_hf_megatron_is_bitwise_and_shipped_code_matches(corpus, tmp_path, layout):
    extra = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"] if layout == "tp2-sp" else []
    spawn(_train, 2 if extra else 1, _train_config(corpus, tmp_path / "ckpt", *extra, name="tiny-lact"))
    spawn(_export_round_trip, 1, tmp_path / "ckpt", tmp_path, 40_000 if extra else 5 * 1024**3)


# The published 760M json's fields, scaled down; fields left out take the authors' class defaults.
AUTHORS_CONFIG = dict(
    model_type="lact_swiglu", architectures=["LaCTForCausalLM"], hidden_size=48, num_hidden_layers=2,
    num_attn_heads=4, num_lact_heads=2, inter_multi=1, lact_chunk_size=8, window_size=6, w0_w2_low_rank=4,
    use_momentum=True, use_muon=True, rope_theta=1e6, max_position_embeddings=128, vocab_size=257,
    intermediate_size=96, tie_word_embeddings=False, bos_token_id=1, eos_token_id=256, pad_token_id=None,
)


def _authors_checkpoint(path, config):
    """A checkpoint as the authors' save_pretrained writes it: their tensor names and shapes, random values."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) + (1.0 if len(s) == 1 else 0.0)
               for k, s in authors_keys(config).items()}
    for k in tensors:
        if k.endswith("lr_proj.bias"):  # rates of softplus(b + inv_softplus(1e-3)): keep them moderate
            tensors[k] = tensors[k] - 1.0
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))


def _authors_checkpoint_imports_and_finetunes(corpus, tmp):
    _authors_checkpoint(tmp / "authors", AUTHORS_CONFIG)
    initialize(device="cpu")
    import_from_hf(tmp / "authors", tmp / "imported", tp=2)
    imported = _megatron_model(tmp / "imported")
    cfg = imported.config
    assert (cfg.ttt_norm_eps, cfg.ttt_l2_norm, cfg.use_muon, cfg.lact_chunk_size, cfg.rope_theta) == (
        1e-5, "lact", True, 8, 1e6)
    # our shipped code, pointed at the authors' folder (as a user adds it to their download), reads it unchanged
    from megatron_refine.conversion import lact

    for name in lact.REMOTE_FILES:
        (tmp / "authors" / name).write_text((lact.REMOTE_CODE / name).read_text())
    config = json.loads((tmp / "authors" / "config.json").read_text())
    (tmp / "authors" / "config.json").write_text(json.dumps({**config, "auto_map": lact.AUTO_MAP}))
    # Random weights with Muon, chunks of 8 tokens under a head dim of 24: each update is rank-deficient, and
    # Newton-Schulz brings its rounding noise up to full size (docs/benchmarks.md, LaCT's Newton-Schulz precision).
    # The two fp32 implementations then differ by up to 2e-4 on some CPUs (their matmul kernels round differently);
    # the trained checkpoints above keep 1e-4.
    _assert_hf_matches(tmp / "authors", imported, 257, atol=1e-3)

    finetune_and_export(corpus, tmp)
    exported = json.loads((tmp / "exported" / "config.json").read_text())
    for key in ("hidden_size", "num_attn_heads", "num_lact_heads", "lact_chunk_size", "window_size",
                "w0_w2_low_rank", "use_muon", "rope_theta", "eos_token_id", "bos_token_id", "pad_token_id"):
        assert exported[key] == AUTHORS_CONFIG[key], key
    # fine-tuned a little from the random checkpoint: as above
    _assert_hf_matches(tmp / "exported", _megatron_model(tmp / "tuned"), 257, atol=1e-3)


def test_authors_checkpoint_imports_finetunes_and_exports(corpus, tmp_path):
    spawn(_authors_checkpoint_imports_and_finetunes, 1, corpus, tmp_path)


def _no_v_silu_imports_and_matches(tmp):
    """The authors' fused-kernel json sets no_v_silu (SiLU on the fast path's q and k, not v): it imports, and our
    shipped code and the Megatron model agree with it on and differ from the same weights without it."""
    from megatron_refine.conversion import lact

    config = {**AUTHORS_CONFIG, "no_v_silu": True, "use_fused_kernel": True, "fp32_states": True, "use_muon": False,
              "auto_map": lact.AUTO_MAP}
    _authors_checkpoint(tmp / "authors", config)
    for name in lact.REMOTE_FILES:
        (tmp / "authors" / name).write_text((lact.REMOTE_CODE / name).read_text())
    initialize(device="cpu")
    import_from_hf(tmp / "authors", tmp / "imported")
    model = _megatron_model(tmp / "imported")
    assert model.config.no_v_silu
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))  # five chunks of 8
    hf = _hf_model(tmp / "authors")
    with torch.no_grad():
        expected = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)
    model.config.no_v_silu = hf.config.no_v_silu = False
    with torch.no_grad():
        changed = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(_logits(model, tokens), changed, atol=1e-4, rtol=1e-4)
    assert (changed - expected).abs().max() > 1e-2
    export_to_hf(tmp / "imported", tmp / "exported")
    assert json.loads((tmp / "exported" / "config.json").read_text())["no_v_silu"] is True


def test_no_v_silu_checkpoint_imports_and_matches(tmp_path):
    spawn(_no_v_silu_imports_and_matches, 1, tmp_path)


def test_cached_decoding_keeps_a_bounded_state(tmp_path):
    """The cache holds the window's W-1 keys and at most one chunk of pending tokens, whatever the length."""
    from megatron_refine.conversion.lact_hf.configuration_lact_swiglu import LaCTSWIGLUConfig
    from megatron_refine.conversion.lact_hf.modeling_lact_swiglu import LaCTCache, LaCTForCausalLM

    config = LaCTSWIGLUConfig(**{k: v for k, v in AUTHORS_CONFIG.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    model = LaCTForCausalLM(config).eval()
    cache, tokens = LaCTCache(), torch.randint(0, 257, (1, 3))
    with torch.no_grad():
        for _ in range(30):
            out = model(tokens, past_key_values=cache, use_cache=True)
            tokens = out.logits[:, -1:].argmax(-1)
    memory, k_window, _ = cache.layers[0]
    assert cache.seen_tokens == 32 and k_window.shape[1] == config.window_size - 1
    assert memory.length == 8 and len(memory.pending) == 8  # tokens 25..32: their update fires with token 33


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"model_type 'llama': convert-from-hf reads 'delta_net' \(fla's DeltaNet\)"),
    ({"attn_qk_norm": True}, r"attn_qk_norm=True \(RMSNorm on the attention q and k\)"),
    ({"lr_dim": 2}, r"lr_dim=2 \(more than one learning rate"),
    ({"ttt_prenorm": True}, r"ttt_prenorm=True \(pre-norm test-time training\)"),
    ({"ttt_loss_type": "l2"}, r"ttt_loss_type='l2' \(a fast-weight loss other than the negative dot product\)"),
    ({"num_lact_heads": 5}, r"num_lact_heads"),
    ({"tp": 8}, r"--tp 8 --pp 1 does not divide the model's 4 heads and 2 layers"),
    ({"vocab_size": 10}, r"vocab_size 10 is smaller than its tokenizer's 12 tokens"),
])
def test_bad_lact_inputs_are_named(tmp_path, change, message):
    from test_deltanet_hf import assert_import_refused

    assert_import_refused(tmp_path, {**AUTHORS_CONFIG, **change}, message, tokens=12)


def test_shipped_code_refuses_padding_and_unsupported_options():
    from megatron_refine.conversion.lact_hf.configuration_lact_swiglu import LaCTSWIGLUConfig
    from megatron_refine.conversion.lact_hf.modeling_lact_swiglu import LaCTForCausalLM

    base = {k: v for k, v in AUTHORS_CONFIG.items() if k not in ("model_type", "architectures")}
    with pytest.raises(ValueError, match=r"attn_qk_norm=True is not implemented"):
        LaCTForCausalLM(LaCTSWIGLUConfig(**base, attn_qk_norm=True))
    model = LaCTForCausalLM(LaCTSWIGLUConfig(**base)).eval()
    with pytest.raises(ValueError, match=r"padded batches are not supported"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))


def test_export_refuses_what_lact_swiglu_cannot_express():
    from megatron_refine.conversion import lact
    from megatron_refine.models import get_config

    with pytest.raises(ValueError, match=r"lact_base_lr=0.002 has no lact_swiglu equivalent"):
        lact.hf_config(get_config("lact_tiny", lact_base_lr=2e-3), 257, {}, torch.float32)
