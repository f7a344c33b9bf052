"""Weights-only loads across layer specs: a local-spec checkpoint loads into a Transformer-Engine model (whose
modules add `_extra_state`, their FP8 metadata) and back. TE needs CUDA, so its extra state is imitated here."""

import io

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron_modules import tiny_fast_weight_model

from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import load_model_weights, start_write_results_queue


def _with_extra_state(model):
    """Give every MLP linear a TE-like `_extra_state` (a serialised buffer, as TE's get_extra_state returns)."""
    for layer in model.decoder.layers:
        for linear in (layer.mlp.linear_fc1, layer.mlp.linear_fc2):
            base = type(linear)
            linear.__class__ = type(f"TELike{base.__name__}", (base,), {
                "get_extra_state": lambda self: io.BytesIO(b"fp8 meta"),
                "set_extra_state": lambda self, state: None,
            })
    return model


def _weights_cross_specs(root, save_extra):
    initialize(seed=1, device="cpu")
    source = tiny_fast_weight_model("deltanet_tiny")
    if save_extra:
        _with_extra_state(source)
    start_write_results_queue()
    dist_checkpointing.save({"model": source.sharded_state_dict()}, str(root))
    initialize(seed=2, device="cpu")  # other initial weights: they must come from the checkpoint
    target = tiny_fast_weight_model("deltanet_tiny")
    if not save_extra:
        _with_extra_state(target)
    assert any(k.endswith("._extra_state") for k in (target if not save_extra else source).state_dict())
    load_model_weights(root, target)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("save_extra", [False, True], ids=["local-into-te", "te-into-local"])
def test_weights_load_across_layer_specs(tmp_path, save_extra):
    spawn(_weights_cross_specs, 1, tmp_path, save_extra)


def _missing_weights_are_named(root):
    initialize(seed=1, device="cpu")
    start_write_results_queue()
    model = tiny_fast_weight_model("deltanet_tiny", use_output_norm=False)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(root))
    with pytest.raises(ValueError, match=r"lacks \['decoder.layers.self_attention.o_norm.weight'\] \(a different model"):
        load_model_weights(root, tiny_fast_weight_model("deltanet_tiny"))


def test_a_checkpoint_without_the_models_weights_is_refused(tmp_path):
    spawn(_missing_weights_are_named, 1, tmp_path)
