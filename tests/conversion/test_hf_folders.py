"""What conversion reads and writes besides the weights: a used --save folder is refused and `overwrite` replaces
it whole (a failed write leaves it as it was), a folder's tokenizer files travel both ways, fla's MLP layout before
2025-02 (one fused gate_proj) imports, a damaged checkpoint file is named, and an imported pad token's embedding
row gets no gradient from its lookups (as nn.Embedding(padding_idx=...) in the HF model)."""

import json
import multiprocessing
import os

import pytest
import torch
from test_deltanet_hf import FLA_CONFIG, _word_tokenizer

from megatron_refine.runtime import initialize, spawn

TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "</s>",
                    "pad_token": "t0", "model_max_length": 4096}


def _fla_folder(path, fused_mlp=False):
    """fla's DeltaNetForCausalLM (random weights) saved with a tokenizer's files; with `fused_mlp`, each MLP as fla
    wrote it before 2025-02: gate_proj [2F, h] = cat[gate | up], no up_proj."""
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = DeltaNetForCausalLM(DeltaNetConfig(**FLA_CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    _word_tokenizer(path / "tokenizer.json", 257, eos="</s>")
    (path / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    (path / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in TOKENIZER_CONFIG.items()
                                                              if k.endswith("_token")}))
    if fused_mlp:
        tensors = load_file(str(path / "model.safetensors"))
        for name in [n for n in tensors if n.endswith("mlp.up_proj.weight")]:
            gate = name.replace("up_proj", "gate_proj")
            tensors[gate] = torch.cat([tensors[gate], tensors.pop(name)])
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _folders_and_tokenizers(tmp):
    from transformers import AutoTokenizer

    from megatron_refine.cli import _error_line
    from megatron_refine.conversion import export_to_hf, import_from_hf
    from megatron_refine.training import checkpoint_format
    from megatron_refine.training.checkpoint_format import MARKER, CheckpointError

    initialize(device="cpu")
    fla, old = _fla_folder(tmp / "fla"), _fla_folder(tmp / "fla_old", fused_mlp=True)
    assert "model.layers.0.mlp.up_proj.weight" not in _tensors(old)

    # the import carries the folder's tokenizer files; a used --save folder (a training run's) is refused
    ck = tmp / "ck"
    import_from_hf(fla, ck)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MARKER} <= set(os.listdir(ck))
    (ck / "iter_0000004").mkdir()
    (ck / MARKER).write_text("4")
    with pytest.raises(ValueError, match=r"--save .*ck is not empty \(it holds iter_0000000, iter_0000004, .*\): "
                                         r"pick another --save, or pass --overwrite"):
        import_from_hf(fla, ck)
    assert (ck / MARKER).read_text() == "4"
    # --overwrite never replaces the folder of a run that is saving there (it holds the folder's lock)
    ctx = multiprocessing.get_context("fork")
    locked, done = ctx.Event(), ctx.Event()
    run = ctx.Process(target=_hold_the_save_folder, args=(ck, locked, done))
    run.start()
    try:
        assert locked.wait(30)
        with pytest.raises(ValueError, match=rf"ck is in use by a training run \(pid {run.pid} on .*checkpoint.lock\)"):
            import_from_hf(old, ck, overwrite=True)
    finally:
        done.set()
        run.join()
    assert (ck / MARKER).read_text() == "4"
    # a failed overwrite leaves the folder as it was, and no temporary folder beside it
    save = checkpoint_format.save_streamed
    checkpoint_format.save_streamed = lambda *args: (_ for _ in ()).throw(RuntimeError("killed mid-write"))
    try:
        with pytest.raises(RuntimeError, match="killed mid-write"):
            import_from_hf(old, ck, overwrite=True)
    finally:
        checkpoint_format.save_streamed = save
    assert (ck / MARKER).read_text() == "4" and sorted(os.listdir(tmp)) == ["ck", "fla", "fla_old"]
    # overwrite replaces it whole; fla's fused MLP layout imports as the split one (the export equals fla's tensors)
    import_from_hf(old, ck, overwrite=True)
    assert not (ck / "iter_0000004").exists() and (ck / MARKER).read_text() == "0"
    export_to_hf(ck, tmp / "hf", tokenizer=str(ck / "tokenizer.json"))
    exported, original = _tensors(tmp / "hf"), _tensors(fla)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)

    # --tokenizer x/tokenizer.json ships x's other tokenizer files: bos, pad and model_max_length stay
    tok = AutoTokenizer.from_pretrained(tmp / "hf")
    assert (tok.bos_token, tok.pad_token, tok.eos_token, tok.model_max_length) == ("t1", "t0", "</s>", 4096)
    assert (tmp / "hf" / "special_tokens_map.json").read_text() == (fla / "special_tokens_map.json").read_text()
    # also where tokenizer.json links elsewhere, as in the Hugging Face cache (snapshots/REV/ -> blobs/)
    (tmp / "blobs").mkdir()
    (tmp / "snapshot").mkdir()
    os.replace(tmp / "hf" / "tokenizer.json", tmp / "blobs" / "0123abcd")
    (tmp / "snapshot" / "tokenizer.json").symlink_to(tmp / "blobs" / "0123abcd")
    os.replace(tmp / "hf" / "tokenizer_config.json", tmp / "snapshot" / "tokenizer_config.json")
    export_to_hf(ck, tmp / "hf_snapshot", tokenizer=str(tmp / "snapshot" / "tokenizer.json"))
    assert AutoTokenizer.from_pretrained(tmp / "hf_snapshot").model_max_length == 4096
    # an export into a used folder: refused, then replaced whole (no old file stays beside the new model)
    (tmp / "hf" / "tokenizer.model").write_text("an earlier export's")
    with pytest.raises(ValueError, match=r"hf is not empty .*pass --overwrite to replace that folder whole"):
        export_to_hf(ck, tmp / "hf")
    # a bare tokenizer.json: the written tokenizer_config.json names the imported model's pad token
    (tmp / "bare").mkdir()
    _word_tokenizer(tmp / "bare" / "tokenizer.json", 257, eos="</s>")
    export_to_hf(ck, tmp / "hf", tokenizer=str(tmp / "bare" / "tokenizer.json"), overwrite=True)
    assert sorted(f for f in os.listdir(tmp / "hf") if "token" in f) == ["tokenizer.json", "tokenizer_config.json"]
    tok = AutoTokenizer.from_pretrained(tmp / "hf")
    assert (tok.pad_token, tok.eos_token) == ("t0", "</s>")
    with pytest.raises(ValueError, match=r"holds --load .*ck, which --overwrite would delete"):
        export_to_hf(ck, tmp, overwrite=True)

    # a damaged checkpoint file (the import records checksums as a training save does): one line naming it
    distcp = next((ck / "iter_0000000").glob("*.distcp"))
    data = bytearray(distcp.read_bytes())
    data[-100] ^= 1
    distcp.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{distcp} is corrupt"):
        export_to_hf(ck, tmp / "hf_corrupt")
    os.truncate(distcp, distcp.stat().st_size // 2)
    with pytest.raises(CheckpointError) as error:
        export_to_hf(ck, tmp / "hf_truncated")
    assert _error_line(error.value).startswith(f"{distcp} is truncated")
    assert not (tmp / "hf_truncated").exists()


def _hold_the_save_folder(root, locked, done):
    """A training run's rank 0 saving into `root`, as far as the folder's lock goes."""
    from megatron_refine.training.checkpointing import _lock

    assert _lock(root) is None
    locked.set()
    done.wait(60)


def test_used_folders_tokenizer_files_and_fla_fused_mlp(tmp_path):
    spawn(_folders_and_tokenizers, 1, tmp_path)


def _pad_row_gets_no_lookup_gradient(tmp):
    import yaml

    from megatron_refine.conversion import import_from_hf
    from megatron_refine.models import build_model, get_config

    initialize(device="cpu")
    import_from_hf(_fla_folder(tmp / "fla"), tmp / "ck")  # config.json: pad_token_id 0
    model_args = yaml.safe_load((tmp / "ck" / "model_config.yaml").read_text())["model"]
    assert model_args["overrides"]["pad_token_id"] == 0
    ids = torch.tensor([[0, 5, 0, 7, 9, 0]])
    for tied in (False, True):
        grads, weights = [], None
        for pad in (0, None):  # the same weights with and without a pad token
            config = get_config(model_args["config"], **{**model_args["overrides"], "pad_token_id": pad},
                                tie_word_embeddings=tied, use_cpu_initialization=True)
            model = build_model(config, 257)
            weights = weights or model.state_dict()
            model.load_state_dict(weights)
            model(ids, None, None)[..., :257].square().mean().backward()
            grads.append(model.embedding.word_embeddings.weight.grad)
        (with_pad, without) = grads
        assert without[0].abs().sum() > 0 and torch.equal(with_pad[5], without[5])
        if tied:  # the output layer's gradient alone, as an HF model with tied embeddings gets
            model.zero_grad()
            model.output_layer.register_forward_pre_hook(lambda _, args: (args[0].detach(), *args[1:]))
            model(ids, None, None)[..., :257].square().mean().backward()
            torch.testing.assert_close(with_pad[0], model.embedding.word_embeddings.weight.grad[0])
        else:
            assert with_pad[0].abs().sum() == 0


def test_imported_pad_row_gets_no_lookup_gradient(tmp_path):
    spawn(_pad_row_gets_no_lookup_gradient, 1, tmp_path)
