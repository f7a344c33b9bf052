"""LaCT's fused input projection: under sequence parallelism a layer gathers the sequence once, the parameter count
is that of the separate projections it replaces, and a dist checkpoint written with those separate projections
(`qkv`, `lr_proj`, `momentum_proj`, `ttt_scale_proj`, as before the fusion) loads at another TP size with the
outputs it had."""

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import ColumnParallelLinear, gather_from_tensor_model_parallel_region
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel import mappings as tp_mappings
from megatron_modules import tiny_fast_weight_model, token_batch

from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import load_model_weights, start_write_results_queue

B, T = 2, 24
WITHOUT_RATES = dict(use_momentum=False, learnable_ttt_scale=False)


def _collectives_in_one_mixer_forward():
    """(all-gathers, reduce-scatters) that one LaCT mixer's forward runs at TP=2 with sequence parallelism."""
    initialize(tp=2, seed=3, device="cpu")
    model = tiny_fast_weight_model("lact_tiny", sequence_parallel=True)
    mixer = model.decoder.layers[0].self_attention
    assert sum(isinstance(m, ColumnParallelLinear) for m in mixer.modules()) == 1
    calls = {"all_gather": [], "reduce_scatter": []}
    patched = []
    for module in (tp_layers, tp_mappings):
        for kind in calls:
            name = f"dist_{kind}_func"
            if hasattr(module, name):
                real = getattr(module, name)
                # default argument binds this iteration's kind and function
                def counting(output, input_, *args, _kind=kind, _real=real, **kwargs):
                    calls[_kind].append(tuple(output.shape))
                    return _real(output, input_, *args, **kwargs)

                setattr(module, name, counting)
                patched.append((module, name, real))
    x = torch.randn(T // 2, B, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # [s/t, b, h]
    try:
        with torch.no_grad():
            out, _ = mixer(x)
    finally:
        for module, name, real in patched:
            setattr(module, name, real)
    assert out.shape == x.shape
    return calls


def test_sequence_parallel_lact_layer_gathers_the_sequence_once():
    for calls in spawn(_collectives_in_one_mixer_forward, 2):
        assert [shape[0] for shape in calls["all_gather"]] == [T]  # in_proj: the whole sequence, once
        assert [shape[0] for shape in calls["reduce_scatter"]] == [T // 2]  # out_proj


def _parameter_counts(overrides):
    initialize(seed=5, device="cpu")
    model = tiny_fast_weight_model("lact_tiny", **overrides)
    mixer, cfg = model.decoder.layers[0].self_attention, model.config
    h, H = cfg.hidden_size, cfg.num_lact_heads
    extra = int(cfg.use_momentum) + int(cfg.learnable_ttt_scale)
    projections = 3 * h * h + (3 * H * (h + 1)) + extra * H * (h + 1)  # qkv; lr_proj, momentum/ttt_scale + biases
    return mixer.in_proj.weight.numel() + mixer.rate_bias.numel(), projections


@pytest.mark.parametrize("overrides", [{}, WITHOUT_RATES], ids=["all", "lr-only"])
def test_fused_projection_has_the_separate_projections_parameters(overrides):
    fused, projections = spawn(_parameter_counts, 1, overrides)[0]
    assert fused == projections


def _old_layout_state(model) -> dict:
    """The model's sharded state dict as the separate projections saved it: per layer, the rows of this rank's
    in_proj under `qkv.weight.query|key|value`, `lr_proj.weight`, ... and rate_bias under `lr_proj.bias`, ...,
    each sharded over TP on its own (written out here, not through the model's sharded_state_dict)."""
    cfg = model.config
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    h, H, L = cfg.hidden_size, cfg.num_lact_heads, cfg.num_layers
    rates = [("lr_proj", 3 * H)]
    rates += [("momentum_proj", H)] if cfg.use_momentum else []
    rates += [("ttt_scale_proj", H)] if cfg.learnable_ttt_scale else []
    weights = [("qkv.weight.query", h), ("qkv.weight.key", h), ("qkv.weight.value", h)]
    weights += [(f"{name}.weight", rows) for name, rows in rates]
    biases = [(f"{name}.bias", rows) for name, rows in rates]
    state = model.sharded_state_dict()
    for layer in model.decoder.layers:
        mixer, prefix = layer.self_attention, f"decoder.layers.{layer.layer_number - 1}.self_attention."
        for name in ("in_proj.weight", "in_proj._extra_state", "rate_bias"):
            del state[f"{prefix}{name}"]
        for tensor, pieces in ((mixer.in_proj.weight, weights), (mixer.rate_bias, biases)):
            for (name, _), rows in zip(pieces, tensor.detach().split([rows // tp for _, rows in pieces])):
                state[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                    f"decoder.layers.self_attention.{name}", rows.clone(), (0, layer.layer_number - 1, L),
                    (1, rank, tp), prepend_axis_num=1)
    return state


def _logits(model):
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(token_batch(B, T, seed=2), None, None))


def _save_old_layout(root, tp, overrides):
    initialize(tp=tp, seed=21, device="cpu")
    model = tiny_fast_weight_model("lact_tiny", **overrides)
    with torch.no_grad():  # nonzero rate biases (they start at zero), so their pieces are checked too
        model.decoder.layers[0].self_attention.rate_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    if torch.distributed.get_rank() == 0:
        root.mkdir(parents=True)
    torch.distributed.barrier()
    start_write_results_queue()
    dist_checkpointing.save({"model": _old_layout_state(model)}, str(root))
    return _logits(model)


def _load_new_layout(root, tp, overrides):
    initialize(tp=tp, seed=999, device="cpu")  # another seed: the weights must come from the checkpoint
    keys = set(dist_checkpointing.load_tensors_metadata(str(root)))
    assert not any("in_proj" in k or "rate_bias" in k for k in keys)  # only the separate projections' keys
    assert ("decoder.layers.self_attention.momentum_proj.weight" in keys) == ("use_momentum" not in overrides)
    model = tiny_fast_weight_model("lact_tiny", **overrides)
    before = _logits(model)
    load_model_weights(root, model)
    after = _logits(model)
    assert not torch.allclose(before, after)
    return after


@pytest.mark.parametrize(("save_tp", "load_tp", "overrides"), [(1, 2, {}), (2, 1, {}), (2, 1, WITHOUT_RATES)],
                         ids=["tp1-to-tp2", "tp2-to-tp1", "tp2-to-tp1-lr-only"])
def test_checkpoint_of_the_separate_projections_loads_with_the_same_outputs(tmp_path, save_tp, load_tp, overrides):
    saved = spawn(_save_old_layout, save_tp, tmp_path / "old", save_tp, overrides)[0]
    loaded = spawn(_load_new_layout, load_tp, tmp_path / "old", load_tp, overrides)[0]
    torch.testing.assert_close(loaded, saved, atol=1e-5, rtol=1e-4)
