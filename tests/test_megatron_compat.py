"""Each adapter in megatron_refine/megatron_compat.py does its job on the installed megatron-core (CI runs this
file on both ends: 0.16.1 and 0.19.x)."""

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_refine import megatron_compat
from megatron_refine.runtime import initialize, spawn


def test_split_tensor_factory_saves_a_fused_weight_as_named_pieces_and_merges_them_back():
    fused = torch.arange(24.0).reshape(6, 4)  # [q 2 | k 4] rows
    factory = megatron_compat.split_tensor_factory(
        ShardedTensor.from_rank_offsets("layer.in_proj.weight", fused, replica_id=0), [2, 4], ["q", "k"], 0)
    pieces = factory.build()
    assert [(p.key, tuple(p.data.shape), tuple(p.global_shape)) for p in pieces] == [
        ("layer.in_proj.weight.q", (2, 4), (2, 4)), ("layer.in_proj.weight.k", (4, 4), (4, 4))]
    assert torch.equal(factory.merge_fn([p.data for p in pieces]), fused)


def _save_and_read_common(path):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_refine.training.checkpointing import start_write_results_queue

    initialize(device="cpu")
    start_write_results_queue()
    weight = ShardedTensor.from_rank_offsets("w", torch.ones(3), replica_id=0)
    common = {"iteration": 7, "config": {"model": {"config": "deltanet_tiny"}}}
    state = {"model": {"w": weight}, **common}
    dist_checkpointing.save(state, str(path))
    written_by_megatron = (path / megatron_compat.COMMON_STATE_FILE).is_file()
    index = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    embedded = [k for k in index if k.startswith(megatron_compat.COMMON_STATE_KEY)]
    megatron_compat.write_common_state_file(path, state)
    from_file = torch.load(path / megatron_compat.COMMON_STATE_FILE, weights_only=True)
    expected_object = megatron_compat.common_state_object(common)
    return (common, written_by_megatron, embedded, from_file, dist_checkpointing.load_common_state_dict(str(path)),
            None if expected_object is None else expected_object.unique_key)


def test_every_saved_checkpoint_gets_the_common_pt_every_release_reads(tmp_path):
    common, written_by_megatron, embedded, from_file, loaded, object_key = spawn(_save_and_read_common, 1, tmp_path)[0]
    # 0.16.1 writes common.pt itself; 0.19 puts the common state inside the torch_dist files instead ...
    assert written_by_megatron != megatron_compat.COMMON_STATE_IN_TORCH_DIST
    assert bool(embedded) == megatron_compat.COMMON_STATE_IN_TORCH_DIST
    # ... as the object the streamed HF import plans for it (None where the release does not embed it) ...
    assert embedded == ([object_key] if object_key else [])
    # ... and after write_common_state_file the file holds it on either release, as the release reads it.
    assert from_file == loaded == common


def _layer_mlps_and_log():
    import logging

    from megatron.core.transformer.mlp import MLP

    from megatron_refine.models import build_model, get_config

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.transformer.transformer_layer").addHandler(handler)
    initialize(device="cpu")
    model = build_model(get_config("deltanet_tiny", num_layers=2, use_cpu_initialization=True), 257, use_te=False)
    return [type(layer.mlp) is MLP for layer in model.decoder.layers], [r.getMessage() for r in records]


def test_the_layer_spec_builds_megatrons_mlp_the_way_the_installed_release_asks():
    """0.19 rewraps a ModuleSpec(MLP) with a warning at every layer; mlp_submodule gives what each release takes."""
    is_mlp, messages = spawn(_layer_mlps_and_log, 1)[0]
    assert is_mlp == [True, True]
    assert not [m for m in messages if "Rewrapping" in m], messages
