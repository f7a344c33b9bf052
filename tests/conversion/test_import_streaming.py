"""The import streams: it writes the dist checkpoint group by group from the meta model's sharded state dict, and
what it writes is what `dist_checkpointing.save` of the whole model writes (same index entries and chunks, same
common state), loads at TP=1 and TP=2 to the same weights, and passes `verify_files`."""

import torch

from megatron_refine.runtime import initialize, spawn

VOCAB, LAYERS = 257, 3


def _model(config_overrides=None):
    from megatron_refine.models import build_model, get_config

    config = get_config("deltanet_tiny", num_layers=LAYERS, use_cpu_initialization=True, perform_initialization=False,
                        **(config_overrides or {}))
    return build_model(config, VOCAB, use_te=False)


def _reference_and_import(tmp):
    """A random TP=1 checkpoint saved whole (`ref`), exported to fla (`hf`) and imported back (`imported`)."""
    from megatron.core import dist_checkpointing

    from megatron_refine.conversion import export_to_hf, import_from_hf
    from megatron_refine.training import checkpoint_format
    from megatron_refine.training.checkpoint_format import MARKER, checkpoint_dir
    from megatron_refine.training.checkpointing import model_identity, start_write_results_queue

    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        model.embedding.word_embeddings.weight[VOCAB:] = 0  # padded rows: an import writes zeros there
        model.output_layer.weight[VOCAB:] = 0
    folder = checkpoint_dir(tmp / "ref", 0)
    folder.mkdir(parents=True)
    start_write_results_queue()
    model_args = {"config": "deltanet_tiny", "overrides": {"num_layers": LAYERS}}
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0, "layout": {"tp": 1, "pp": 1, "dp": 1},
                             "vocab_size": VOCAB, "model_identity": model_identity(model), "tokenizer_hash": None,
                             "hf_token_ids": {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
                             "config": {"model": model_args}}, str(folder))
    (tmp / "ref" / MARKER).write_text("0")
    export_to_hf(tmp / "ref", tmp / "hf")

    groups, save = [], checkpoint_format.save_streamed

    def recording(sharded, common, stream, path):
        def counted():
            for group in stream:
                groups.append(sum(t.numel() for t in group.values()))
                yield group
        return save(sharded, common, counted(), path)

    checkpoint_format.save_streamed = recording
    try:
        imported = import_from_hf(tmp / "hf", tmp / "imported")
    finally:
        checkpoint_format.save_streamed = save
    return model, folder, imported, groups


def _imports_what_a_whole_save_writes(tmp):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_refine.training.checkpoint_format import verify_files
    from megatron_refine.training.checkpointing import load_model_weights

    initialize(device="cpu")
    model, ref, imported, groups = _reference_and_import(tmp)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
    assert len(groups) == 3 + LAYERS and sum(groups) == total  # embedding, each layer, final norm, output layer
    assert max(groups) <= max(layer, model.embedding.word_embeddings.weight.numel()) < total / 2

    verify_files(imported)
    a, b = (FileSystemReader(str(p)).read_metadata().state_dict_metadata for p in (ref, imported))
    assert a == b  # every key, global shape, dtype and chunk: the index megatron-core's save writes
    common = [dist_checkpointing.load_common_state_dict(str(p)) for p in (ref, imported)]
    assert common[1]["config"]["model"]["config"] == "deltanet_1p3b"  # the import names fla's base preset
    assert {**common[0], "config": None} == {**common[1], "config": None}
    assert (ref / "metadata.json").read_text() == (imported / "metadata.json").read_text()

    back = _model()
    load_model_weights(imported, back)
    for (name, x), y in zip(model.state_dict().items(), back.state_dict().values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


    # a bf16 folder (read from its safetensors header's dtype) imports as the fp32 model of its values
    from megatron_refine.conversion import export_to_hf, import_from_hf

    export_to_hf(ref, tmp / "hf16", dtype="bf16")
    half = _model()
    load_model_weights(import_from_hf(tmp / "hf16", tmp / "imported16"), half)
    for (name, x), y in zip(model.state_dict().items(), half.state_dict().values()):
        if isinstance(x, torch.Tensor):
            assert y.dtype == torch.float32 and torch.equal(x.bfloat16().float(), y), name


def test_streamed_import_writes_what_a_whole_save_writes(tmp_path):
    spawn(_imports_what_a_whole_save_writes, 1, tmp_path)


def _loads_at_tp2(tmp):
    from megatron.core import parallel_state

    from megatron_refine.training.checkpointing import load_model_weights

    initialize(tp=2, device="cpu")
    ref_model = _model({"tensor_model_parallel_size": 2})
    imported_model = _model({"tensor_model_parallel_size": 2})
    load_model_weights(tmp / "ref" / "iter_0000000", ref_model)
    load_model_weights(tmp / "imported" / "iter_0000000", imported_model)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    for (name, x), y in zip(ref_model.state_dict().items(), imported_model.state_dict().values()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name


def _import_only(tmp):
    initialize(device="cpu")
    _reference_and_import(tmp)


def test_streamed_import_loads_at_tp2(tmp_path):
    spawn(_import_only, 1, tmp_path)
    spawn(_loads_at_tp2, 2, tmp_path)
