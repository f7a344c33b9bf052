"""Gated DeltaNet <-> fla's Hugging Face `gated_deltanet` format: round trips are bitwise both ways (an fla
checkpoint -> ours -> fla through the CLI; ours REFINE-trained at TP=2 + SP -> fla -> ours, with REFINE
post-training, eval and test-time REFINE from the CLI on the way: a user's whole path), exports load in
transformers with no missing or unexpected keys, their logits in fla's GatedDeltaNetForCausalLM (its Triton pieces
replaced by PyTorch references: megatron_refine.conversion.fla_cpu) equal the Megatron model's, and fla's options
our mixer lacks are refused by name. Grouped value heads (2 key heads, 4 value heads, twice as wide: expand_v 2)."""

import json

import pytest
import torch
from prompt_data import write_qa
from test_deltanet_hf import _megatron_model, assert_import_refused, assert_round_trip_bitwise

from megatron_refine.runtime import initialize, spawn

VOCAB = 257
FLA_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_heads=2, num_v_heads=4, head_dim=8, expand_v=2.0,
                  num_hidden_layers=2, intermediate_size=64, conv_size=4, norm_eps=1e-6, eos_token_id=256,
                  bos_token_id=None, pad_token_id=0)


def _fla_model(hf_dir):
    """The folder in fla's GatedDeltaNetForCausalLM on the CPU, loaded by transformers' Auto class with every
    weight of the folder used and none missing."""
    from transformers import AutoModelForCausalLM

    from megatron_refine.conversion.fla_cpu import use_pytorch_references

    use_pytorch_references()  # imports fla, which registers gated_deltanet with the Auto classes
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    assert type(hf).__name__ == "GatedDeltaNetForCausalLM"
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, error messages
    return hf.eval()


def _assert_logits_equal(hf_dir, model):
    hf = _fla_model(hf_dir)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits  # [B, T, V]
        ours = model(tokens, None, None)[..., :VOCAB]  # [B, T, V padded] -> [B, T, V]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def _save_fla_model(path):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**FLA_CONFIG))
    with torch.no_grad():
        for p in model.parameters():  # norms start at ones: randomise every weight so each one matters
            p.normal_(0, 0.3)
    model.save_pretrained(path)


def _through_the_cli(tmp):
    """fla's model -> convert-from-hf (checked for TP=2) -> convert-to-hf, by the console's own entry point (what
    tools/convert_*_hf.py run); the import's logits equal fla's."""
    from megatron_refine.cli import main

    _save_fla_model(tmp / "fla")
    main(["convert-from-hf", "--load", str(tmp / "fla"), "--save", str(tmp / "imported"), "--tp", "2"])
    main(["convert-to-hf", "--load", str(tmp / "imported"), "--save", str(tmp / "exported")])
    initialize(device="cpu")
    _assert_logits_equal(tmp / "fla", _megatron_model(tmp / "imported"))


def _refine_mid_through_the_cli(corpus, tmp):
    """`megatron-refine train --stage refine-mid` on the import, at TP=2 + SP on two gloo ranks."""
    from megatron_refine.cli import main

    main(["train", "--config", str(tmp / "imported" / "model_config.yaml"), "--load", str(tmp / "imported"),
          "--finetune", "--stage", "refine-mid", "--set", f"data.path={corpus}", "--set", "data.seq_length=48",
          "--set", "data.micro_batch_size=2", "--set", "data.global_batch_size=2", "--set", "train_steps=1",
          "--set", "optimizer.warmup_steps=0", "--set", "optimizer.lr=3e-2", "--set", "device=cpu",
          "--set", "parallel.tensor_model_parallel_size=2", "--set", "parallel.sequence_parallel=true",
          "--set", f"checkpoint.save={tmp / 'tuned'}"])


def _post_train_through_the_cli(tmp, qa):
    """`megatron-refine train --stage refine-post` (nested REFINE on prompt / answer pairs) on the mid-trained
    checkpoint, at TP=2 + SP on two gloo ranks."""
    from megatron_refine.cli import main

    main(["train", "--config", str(tmp / "imported" / "model_config.yaml"), "--load", str(tmp / "tuned"),
          "--finetune", "--stage", "refine-post", "--set", "data.layout=prompt_answer", "--set", f"data.path={qa}",
          "--set", "data.seq_length=96", "--set", "data.max_answer_tokens=8", "--set", "data.micro_batch_size=2",
          "--set", "data.global_batch_size=2", "--set", "train_steps=1", "--set", "optimizer.warmup_steps=0",
          "--set", "refine.n_chunks=2", "--set", "refine.margin=5", "--set", "refine.k=3", "--set", "device=cpu",
          "--set", "parallel.tensor_model_parallel_size=2", "--set", "parallel.sequence_parallel=true",
          "--set", f"checkpoint.save={tmp / 'post'}"])


def _evaluate_through_the_cli(tmp, qa):
    """`megatron-refine eval` on the REFINE-tuned checkpoint (a needle table), and `eval --ttt refine` (test-time
    REFINE on the task file's prompts, beside the same model without it) on the post-trained one."""
    from megatron_refine.cli import main

    main(["eval", "--load", str(tmp / "tuned"), "--tasks", "niah_single", "--lengths", "384", "--samples", "2",
          "--out-dir", str(tmp / "eval"), "--set", "device=cpu"])
    results = json.loads((tmp / "eval" / "results.json").read_text())
    assert len(results["examples"]) == 2 and results["summary"][0]["task"] == "niah_single"
    main(["eval", "--load", str(tmp / "post"), "--data", qa, "--samples", "0", "--ttt", "refine", "--set", "device=cpu",
          "--set", "data.seq_length=96", "--set", "refine.n_chunks=2", "--set", "refine.margin=5",
          "--set", "refine.k=3", "--out-dir", str(tmp / "ttt")])
    assert (tmp / "ttt" / "results.csv").is_file() and (tmp / "ttt" / "no-ttt" / "results.csv").is_file()


def _export_round_trip(tmp):
    """The fine-tuned checkpoint -> fla (in shards: the index is exercised too) -> ours."""
    from megatron_refine.conversion import export_to_hf

    initialize(device="cpu")
    export_to_hf(tmp / "tuned", tmp / "hf", max_shard_bytes=40_000)
    assert (tmp / "hf" / "model.safetensors.index.json").is_file()
    config = json.loads((tmp / "hf" / "config.json").read_text())
    assert {k: config[k] for k in ("pad_token_id", "eos_token_id", "num_v_heads", "expand_v")} == {
        "pad_token_id": 0, "eos_token_id": 256, "num_v_heads": 4, "expand_v": 2.0}
    source = assert_round_trip_bitwise(tmp / "tuned", tmp / "hf", tmp / "back")
    _assert_logits_equal(tmp / "hf", source)


def test_fla_checkpoint_imports_refine_trains_at_tp2_sp_evaluates_and_exports(corpus, tmp_path):
    """fla -> ours -> fla through the CLI is bitwise; ours REFINE-mid-trained from the CLI at TP=2 + SP (the import
    resharded onto two ranks, in_proj and conv1d piece by piece), then REFINE-post-trained at TP=2 + SP, evaluated
    (with test-time REFINE too), and the mid-trained checkpoint exported (gathered back) -> fla -> ours is bitwise,
    with fla's logits."""
    from safetensors.torch import load_file

    spawn(_through_the_cli, 1, tmp_path)
    source, exported = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("fla", "exported"))
    assert source.keys() == exported.keys()
    for name, value in source.items():
        assert torch.equal(value, exported[name]), name
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("fla", "exported"))
    assert {k: b[k] for k in FLA_CONFIG} == {k: a[k] for k in FLA_CONFIG}

    qa = write_qa(tmp_path / "qa.jsonl", n=8)
    spawn(_refine_mid_through_the_cli, 2, corpus, tmp_path)
    spawn(_post_train_through_the_cli, 2, tmp_path, qa)
    spawn(_evaluate_through_the_cli, 1, tmp_path, qa)
    spawn(_export_round_trip, 1, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"use_gate": False}, r"use_gate=False \(no output gate \(o_norm without g_proj\)\)"),
    ({"use_short_conv": False}, r"use_short_conv=False \(no short convolutions\)"),
    ({"allow_neg_eigval": True}, r"allow_neg_eigval=True \(negative eigenvalues"),
    ({"output_gate_activation": "sigmoid"}, r"output_gate_activation='sigmoid' \(an output gate activation other"),
    ({"conv_bias": True}, r"conv_bias=True \(short-convolution biases\)"),
    ({"attn": {"layers": [1], "num_heads": 2}}, r"sets attn=.*hybrid softmax-attention layers"),
    ({"num_v_heads": 3}, r"num_v_heads=3, not a multiple of num_heads=2"),
    ({"tp": 8}, r"--tp 8 --pp 1 does not divide the model's 4 heads"),
])
def test_bad_hugging_face_inputs_are_named(tmp_path, change, message):
    assert_import_refused(tmp_path, {"model_type": "gated_deltanet", **FLA_CONFIG, **change}, message)


def test_value_head_dims_round_trip_through_expand_v():
    """fla derives the value head dim as int(head_dim * expand_v): an export's expand_v gives back ours even where
    the plain ratio falls a hair short (120 / 88 * 88 = 119.99...)."""
    from megatron_refine.conversion import gated_deltanet
    from megatron_refine.models import get_config

    cfg = get_config("gated_deltanet_tiny", linear_key_head_dim=88, linear_value_head_dim=120)
    config = json.loads(json.dumps(gated_deltanet.hf_config(cfg, VOCAB, {}, torch.float32)))
    assert int(config["head_dim"] * config["expand_v"]) == 120
    _, overrides = gated_deltanet.megatron_model_args(config)
    assert get_config(gated_deltanet.BASE_PRESET, **overrides).linear_value_head_dim == 120
