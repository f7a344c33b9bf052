"""Qwen3.5 text <-> transformers' `qwen3_5_text` (`Qwen3_5ForCausalLM`): a tiny random Qwen3.5 (Gated DeltaNet and
gated attention layers, grouped heads of both, partial RoPE) imports with transformers' logits (fp32) and its greedy
cached generation token for token; the round trip is bitwise and carries the tokenizer files; a vision-language
`qwen3_5` folder imports its language model; options we lack are refused by name; and from the CLI an import is
REFINE-mid-trained at TP=2 + SP on two gloo ranks, evaluated, and exported (bitwise back, transformers' logits).
transformers runs on its PyTorch fallbacks (fla's kernels have no CPU path), each in a process of its own."""

import json
import sys
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch
from test_deltanet_hf import _megatron_model, _word_tokenizer, assert_import_refused, assert_round_trip_bitwise
from test_gated_deltanet_hf import _refine_mid_through_the_cli

from megatron_refine.runtime import initialize, spawn

VOCAB = 257
TEXT_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
    num_attention_heads=8, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    tie_word_embeddings=False, eos_token_id=256, bos_token_id=None, pad_token_id=0,
)
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "t0"}


def _transformers():
    """transformers with its Qwen3.5 on the PyTorch paths: its modeling module binds fla's kernels (Triton, no CPU
    path) when it can import fla. Only in a spawned process: it hides fla from the rest of the process."""
    sys.modules["fla"] = None
    import transformers

    return transformers


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # norms start at zeros, A_log / dt_bias alike: every weight matters
            p.normal_(0, 0.2)
    return model


def _save_qwen(path):
    """A random Qwen3_5ForCausalLM with a tokenizer's files."""
    tf = _transformers()
    _randomised(tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**TEXT_CONFIG))).save_pretrained(path)
    _word_tokenizer(path / "tokenizer.json", VOCAB, eos="</s>")
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))


def _qwen(path):
    """The folder in transformers' Qwen3_5ForCausalLM, every weight used and none missing."""
    tf = _transformers()
    hf, info = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == "Qwen3_5ForCausalLM"
    assert not any(info.values()), info
    return hf.eval()


def _assert_logits_equal(hf, model):
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits  # [B, T, V]
        ours = model(tokens, None, None)[..., :VOCAB]  # [B, T, V padded] -> [B, T, V]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def _import_generate_export(tmp):
    from safetensors.torch import load_file

    from megatron_refine.conversion import export_to_hf, import_from_hf
    from megatron_refine.models import generate

    _save_qwen(tmp / "hf")
    initialize(device="cpu")
    ck = import_from_hf(tmp / "hf", tmp / "ours", tp=2).parent  # TP=2: the format's and the mixers' checks
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in ck.iterdir()}
    model, hf = _megatron_model(ck), _qwen(tmp / "hf")
    _assert_logits_equal(hf, model)

    prompts = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    ours = generate(model, prompts, 12, greedy=True)  # prefill, then one cached step per token
    theirs = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=12, do_sample=False,
                         use_cache=True, eos_token_id=None, pad_token_id=0)[:, 7:]
    assert torch.equal(ours, theirs), (ours, theirs)

    files = export_to_hf(ck, tmp / "back", tokenizer=str(ck / "tokenizer.json"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp / "back" / name).read_bytes() == (tmp / "hf" / name).read_bytes(), name
    source, back = (load_file(str(tmp / d / "model.safetensors")) for d in ("hf", "back"))
    assert source.keys() == back.keys()
    for name, value in source.items():
        assert torch.equal(value, back[name]), name
    a, b = (json.loads((tmp / d / "config.json").read_text()) for d in ("hf", "back"))
    assert {k: b[k] for k in TEXT_CONFIG} == {k: a[k] for k in TEXT_CONFIG}
    _qwen(tmp / "back")  # loads whole


def test_import_matches_transformers_logits_and_greedy_generation_and_round_trips_bitwise(tmp_path):
    spawn(_import_generate_export, 1, tmp_path)


def _vision_language(tmp):
    """A Qwen3_5ForConditionalGeneration folder: its language model imports (said in a message), with the logits
    Qwen3_5ForCausalLM reads from that same folder."""
    from megatron_refine.conversion import import_from_hf

    tf = _transformers()
    text = {**TEXT_CONFIG, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]}
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64, patch_size=4,
                  num_position_embeddings=16)
    vl = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision))
    _randomised(vl).save_pretrained(tmp / "vl")
    initialize(device="cpu")
    with redirect_stdout(StringIO()) as out:
        import_from_hf(tmp / "vl", tmp / "ours")
    assert "converting its language model only" in out.getvalue()
    assert "the vision encoder (model.visual.*) left out" in out.getvalue()
    hf = tf.Qwen3_5ForCausalLM.from_pretrained(tmp / "vl", dtype=torch.float32).eval()
    _assert_logits_equal(hf, _megatron_model(tmp / "ours"))


def test_a_vision_language_checkpoint_imports_its_language_model(tmp_path):
    spawn(_vision_language, 1, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, r"attention_bias=True \(biases on the attention projections\)"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' \(an MLP / short-convolution activation other than SiLU\)"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, r"rope_type='yarn' \(scaled RoPE\)"),
    ({"model_type": "qwen3_5_moe"}, r"model_type 'qwen3_5_moe' \(Qwen3.5 MoE's mixture-of-experts MLPs\)"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 2}, r"layer_types has \['sliding_attention'\]"),
    ({"tp": 4}, r"num_query_groups \(2\) must be divisible by tensor_model_parallel_size \(4\)"),
])
def test_what_qwen3_5_has_and_we_lack_is_refused_by_name(tmp_path, change, message):
    assert_import_refused(tmp_path, {"model_type": "qwen3_5_text", **TEXT_CONFIG, **change}, message)


def test_a_vision_language_config_reads_its_text_config():
    from megatron_refine.conversion import qwen3_5

    wrapper = {"model_type": "qwen3_5", "tie_word_embeddings": True, "text_config": {**TEXT_CONFIG}}
    config, renames, skipped, note = qwen3_5.language_model(wrapper)
    assert config["tie_word_embeddings"] is True and config["model_type"] == "qwen3_5_text"
    assert renames == {"model.language_model.": "model."} and "model.visual." in skipped and "language model" in note
    with pytest.raises(ValueError, match=r"without a text_config"):
        qwen3_5.language_model({"model_type": "qwen3_5"})


def test_export_refuses_a_hybrid_qwen3_5_cannot_hold():
    from megatron_refine.conversion import qwen3_5
    from megatron_refine.conversion.hf import export_format
    from megatron_refine.models import get_config

    assert export_format(get_config("hybrid_tiny")) is qwen3_5
    with pytest.raises(ValueError, match=r"Qwen3.5 layers always have zero-centered norms"):
        qwen3_5.hf_config(get_config("hybrid_tiny", layernorm_zero_centered_gamma=False), VOCAB, {}, torch.float32)
    with pytest.raises(ValueError, match=r"an attention output gate \(attention_output_gate\)"):
        qwen3_5.hf_config(get_config("hybrid_tiny", attention_output_gate=False), VOCAB, {}, torch.float32)


def _import_through_the_cli(tmp):
    """transformers' model -> convert-from-hf (checked for TP=2) by the console's own entry point."""
    from megatron_refine.cli import main

    _save_qwen(tmp / "hf")
    main(["convert-from-hf", "--load", str(tmp / "hf"), "--save", str(tmp / "imported"), "--tp", "2"])


def _evaluate_and_export_through_the_cli(tmp):
    """`megatron-refine eval` (a needle table) and `convert-to-hf` on the tuned checkpoint; the export imports back
    bitwise and gives the tuned model's logits in transformers."""
    from megatron_refine.cli import main

    main(["eval", "--load", str(tmp / "tuned"), "--tasks", "niah_single", "--lengths", "384", "--samples", "2",
          "--out-dir", str(tmp / "eval"), "--set", "device=cpu"])
    results = json.loads((tmp / "eval" / "results.json").read_text())
    assert len(results["examples"]) == 2 and results["summary"][0]["task"] == "niah_single"
    main(["convert-to-hf", "--load", str(tmp / "tuned"), "--save", str(tmp / "exported")])
    config = json.loads((tmp / "exported" / "config.json").read_text())
    assert {k: config[k] for k in ("layer_types", "pad_token_id", "eos_token_id", "rope_parameters")} == {
        k: TEXT_CONFIG[k] for k in ("layer_types", "pad_token_id", "eos_token_id", "rope_parameters")}
    initialize(device="cpu")
    source = assert_round_trip_bitwise(tmp / "tuned", tmp / "exported", tmp / "back")
    _assert_logits_equal(_qwen(tmp / "exported"), source)


def test_qwen3_5_imports_refine_trains_at_tp2_sp_evaluates_and_exports(corpus, tmp_path):
    """A user's whole path from the CLI: import (resharded onto two ranks: linear_qkv per query group, in_proj and
    conv1d piece by piece), REFINE mid-training at TP=2 + SP, eval, export; the export is bitwise the tuned model."""
    spawn(_import_through_the_cli, 1, tmp_path)
    spawn(_refine_mid_through_the_cli, 2, corpus, tmp_path)
    spawn(_evaluate_and_export_through_the_cli, 1, tmp_path)
