"""The export streams: each read of the checkpoint holds one group (the embedding, a layer, the final norm, the
output layer), never the whole model, and what it writes equals the fully loaded model's tensors."""

import torch

from megatron_refine.runtime import initialize, spawn


def _streamed_export_reads_one_group_at_a_time(tmp):
    from megatron.core import dist_checkpointing
    from safetensors import safe_open

    from megatron_refine.conversion import deltanet, export_to_hf
    from megatron_refine.models import build_model, get_config
    from megatron_refine.training import checkpoint_format
    from megatron_refine.training.checkpoint_format import MARKER, checkpoint_dir
    from megatron_refine.training.checkpointing import load_model_weights, model_identity, start_write_results_queue

    initialize(device="cpu")
    config = get_config("deltanet_tiny", num_layers=3, use_cpu_initialization=True, perform_initialization=False)
    model = build_model(config, 257, use_te=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    folder = checkpoint_dir(tmp / "ckpt", 0)
    folder.mkdir(parents=True)
    start_write_results_queue()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0, "vocab_size": 257,
                             "model_identity": model_identity(model), "tokenizer_hash": None,
                             "config": {"model": {"config": "deltanet_tiny", "overrides": {"num_layers": 3}}}},
                            str(folder))
    (tmp / "ckpt" / MARKER).write_text("0")

    reads, read = [], checkpoint_format.ChunkReader.read

    def recording(self, tensors):
        reads.append(({t.key for t in tensors}, sum(t.data.numel() for t in tensors)))
        return read(self, tensors)

    checkpoint_format.ChunkReader.read = recording
    try:
        export_to_hf(tmp / "ckpt", tmp / "hf")
    finally:
        checkpoint_format.ChunkReader.read = read
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.decoder.layers[0].parameters())
    assert len(reads) == 3 + config.num_layers  # embedding, each layer, final norm, output layer
    assert max(n for _, n in reads) <= max(layer, model.embedding.word_embeddings.weight.numel()) < total / 2
    assert sum(n for _, n in reads) == total

    full = build_model(config, 257, use_te=False)
    load_model_weights(folder, full)
    state = full.state_dict()
    expected = {"model.embeddings.weight": state["embedding.word_embeddings.weight"][:257],
                "model.norm.weight": state["decoder.final_layernorm.weight"],
                "lm_head.weight": state["output_layer.weight"][:257]}
    for i in range(config.num_layers):
        expected.update(deltanet.layer_to_hf(full.config, i, state.__getitem__))
    with safe_open(str(tmp / "hf" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name, value in expected.items():
            assert torch.equal(f.get_tensor(name), value), name


def test_streamed_export_reads_one_group_at_a_time(tmp_path):
    spawn(_streamed_export_reads_one_group_at_a_time, 1, tmp_path)
