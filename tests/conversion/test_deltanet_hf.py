"""DeltaNet <-> fla's Hugging Face `delta_net` format: round trips are bitwise, the export's logits in fla's
DeltaNetForCausalLM (its Triton pieces replaced by PyTorch references: megatron_refine.conversion.fla_cpu)
equal the Megatron model's, an fla-made checkpoint imports and fine-tunes, and bad inputs are named."""

import json
from pathlib import Path

import pytest
import torch

from megatron_refine.conversion import export_to_hf, import_from_hf
from megatron_refine.runtime import initialize, spawn

SEQ = 32


def _train_config(corpus, save, *extra, name="tiny-deltanet"):
    from megatron_refine.training import load_config

    return load_config(name, [
        f"data.path={corpus}", f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=0", "optimizer.lr=3e-2", "logging.log_interval=100", "device=cpu", "train_steps=1",
        f"checkpoint.save={save}", *extra,
    ])


def _train(cfg):
    from megatron_refine.training import train

    train(cfg)


def _megatron_model(root):
    """The checkpoint's model at TP=1, loaded as `train --finetune` does (load_checkpoint without an optimizer)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.models import build_model, get_config
    from megatron_refine.training.checkpoint_format import checkpoint_dir, latest_iteration
    from megatron_refine.training.checkpointing import load_checkpoint

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, latest_iteration(root))))
    model_args = common["config"]["model"]
    config = get_config(model_args["config"], use_cpu_initialization=True, perform_initialization=False,
                        **model_args["overrides"])
    model = build_model(config, common["vocab_size"])
    load_checkpoint(root, model)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        logits = model(tokens, None, None)  # [B, T, V padded]
    return logits[..., : model.tokenizer_vocab_size]


def _assert_fla_logits_equal(hf_dir, model, vocab):
    from megatron_refine.conversion.fla_cpu import use_pytorch_references
    from transformers import AutoModelForCausalLM

    use_pytorch_references()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def assert_round_trip_bitwise(root, hf_dir, back):
    """Import `hf_dir` (exported from `root`) to `back`: every tensor equals the source's, the padded vocabulary
    rows cut on export come back as zeros. Returns the source model."""
    import_from_hf(hf_dir, back)
    source, imported = _megatron_model(root), _megatron_model(back)
    vocab = source.tokenizer_vocab_size
    for (name, a), b in zip(source.state_dict().items(), imported.state_dict().values()):
        if not isinstance(a, torch.Tensor):
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            a, padding = a[:vocab], b[vocab:]
            b = b[:vocab]
            assert padding.count_nonzero() == 0, name
        assert torch.equal(a, b), name
    return source


def _export_round_trip(root, tmp, max_shard_bytes):
    initialize(device="cpu")
    files = export_to_hf(root, tmp / "hf", max_shard_bytes=max_shard_bytes)
    assert ("model.safetensors.index.json" in {p.name for p in (tmp / "hf").iterdir()}) == (len(files) > 3)
    source = assert_round_trip_bitwise(root, tmp / "hf", tmp / "back")
    _assert_fla_logits_equal(tmp / "hf", source, source.tokenizer_vocab_size)
    if max_shard_bytes < 1024**3:
        return
    # --tokenizer: a tokenizer.json is shipped (with a tokenizer_config.json naming its EOS); a larger one is refused
    _word_tokenizer(tmp / "tok.json", 257, eos="</s>")
    files = export_to_hf(root, tmp / "hf16", tokenizer=str(tmp / "tok.json"), dtype="bf16")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(str(tmp / "hf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp / "hf16").eos_token_id == 256
    assert json.loads((tmp / "hf16" / "config.json").read_text())["eos_token_id"] == 256
    _word_tokenizer(tmp / "big.json", 300, eos="</s>")
    with pytest.raises(ValueError, match=r"the tokenizer has 300 tokens, the checkpoint's vocabulary only 257"):
        export_to_hf(root, tmp / "hf_big", tokenizer=str(tmp / "big.json"))


def _word_tokenizer(path, size, eos=None):
    """A word-level tokenizer.json of `size` tokens, the last one named `eos`."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(size)}
    if eos:
        vocab = {**{k: v for k, v in vocab.items() if v < size - 1}, eos: size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(path))


@pytest.mark.parametrize("layout", ["tp1", "tp2-sp"])
def test_megatron_hf_megatron_is_bitwise_and_fla_logits_match(corpus, tmp_path, layout):
    extra = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"] if layout == "tp2-sp" else []
    spawn(_train, 2 if extra else 1, _train_config(corpus, tmp_path / "ckpt", *extra))
    # the TP=2 export is split into shards of ~40 KB, so model.safetensors.index.json is exercised too
    spawn(_export_round_trip, 1, tmp_path / "ckpt", tmp_path, 40_000 if extra else 5 * 1024**3)


FLA_CONFIG = dict(vocab_size=257, hidden_size=32, num_heads=2, num_hidden_layers=2, intermediate_size=64,
                  eos_token_id=256, bos_token_id=None, pad_token_id=0, use_gate=True)


def finetune_and_export(corpus, tmp):
    """`train --finetune` 2 steps from the import in tmp/imported (its model_config.yaml) to tmp/tuned, then export
    that to tmp/exported. Called in a process holding a CPU runtime; leaves one."""
    from megatron_refine.runtime import destroy
    from megatron_refine.training import load_config, train

    cfg = load_config(str(tmp / "imported" / "model_config.yaml"), [
        f"data.path={corpus}", f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=0", "logging.log_interval=100", "device=cpu", "train_steps=2",
        f"checkpoint.load={tmp / 'imported'}", "checkpoint.finetune=true", f"checkpoint.save={tmp / 'tuned'}"])
    destroy()  # train() sets up its own runtime
    train(cfg)
    destroy()
    initialize(device="cpu")
    export_to_hf(tmp / "tuned", tmp / "exported")


def _fla_checkpoint_imports_and_finetunes(corpus, tmp):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM

    torch.manual_seed(0)
    fla_model = DeltaNetForCausalLM(DeltaNetConfig(**FLA_CONFIG))
    with torch.no_grad():
        for p in fla_model.parameters():  # norms start at ones: randomise every weight so each one matters
            p.normal_(0, 0.3)
    fla_model.save_pretrained(tmp / "fla")
    initialize(device="cpu")
    import_from_hf(tmp / "fla", tmp / "imported", tp=2)
    _assert_fla_logits_equal(tmp / "fla", _megatron_model(tmp / "imported"), 257)

    finetune_and_export(corpus, tmp)
    exported = json.loads((tmp / "exported" / "config.json").read_text())
    assert {k: exported[k] for k in ("pad_token_id", "eos_token_id", "use_gate")} == {
        "pad_token_id": 0, "eos_token_id": 256, "use_gate": True}
    _assert_fla_logits_equal(tmp / "exported", _megatron_model(tmp / "tuned"), 257)

    bad = json.loads((tmp / "fla" / "config.json").read_text())
    (tmp / "fla" / "config.json").write_text(json.dumps({**bad, "intermediate_size": 96}))
    shapes = r"^model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), config.json asks for \(96, 32\)"
    with pytest.raises(ValueError, match=shapes):
        import_from_hf(tmp / "fla", tmp / "bad")


def test_fla_checkpoint_imports_finetunes_and_exports(corpus, tmp_path):
    spawn(_fla_checkpoint_imports_and_finetunes, 1, corpus, tmp_path)


def assert_import_refused(folder, config: dict, message: str, tokens: int | None = None) -> None:
    """A folder of config.json `config` (its "tp" / "pp" keys: the import's layout) and, given `tokens`, a tokenizer
    of that many tokens: convert-from-hf refuses it with `message`."""
    config = dict(config)
    layout = {k: config.pop(k) for k in ("tp", "pp") if k in config}
    (folder / "config.json").write_text(json.dumps(config))
    if tokens is not None:
        _word_tokenizer(folder / "tokenizer.json", tokens)
    with pytest.raises(ValueError, match=message):
        import_from_hf(folder, folder / "out", **layout)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, r"model_type 'llama': convert-from-hf reads 'delta_net' \(fla's DeltaNet\)"),
    ({"attn": {"layers": [1], "num_heads": 2}}, r"sets attn=.*hybrid softmax-attention layers"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' \(an MLP activation other than SiLU\)"),
    ({"norm_first": True}, r"norm_first=True \(fla's norm_first block layout \(removed in 2025-02\)\)"),
    ({"tp": 3}, r"--tp 3 --pp 1 does not divide the model's 2 heads and 2 layers"),
    ({"pp": 4}, r"--tp 1 --pp 4 does not divide"),
    ({"vocab_size": 10}, r"vocab_size 10 is smaller than its tokenizer's 12 tokens"),
])
def test_bad_hugging_face_inputs_are_named(tmp_path, change, message):
    assert_import_refused(tmp_path, {"model_type": "delta_net", **FLA_CONFIG, **change}, message, tokens=12)


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    command = [sys.executable, "tools/convert_from_hf.py", "--load", str(tmp_path), "--save", str(tmp_path / "o")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "megatron-refine: error: config.json has model_type 'mamba': convert-from-hf reads 'delta_net' (fla's "
        "DeltaNet), 'lact_swiglu' (the LaCT authors' model), 'gated_deltanet' (fla's Gated DeltaNet), 'qwen3_5_text' "
        "(Qwen3.5's text model, also inside a vision-language 'qwen3_5' folder)")
