"""megatron-core dist_checkpointing on gloo: a TP=2 (+SP) save loads at TP=1 with the same weights."""

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron_modules import HIDDEN, swiglu_mlp, tiny_config

from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import start_write_results_queue

SEQ, BATCH = 4, 2


def _probe() -> torch.Tensor:
    return torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(9))  # [s, b, h]


def _full_output(model, sequence_parallel: bool) -> torch.Tensor:
    """The model's output on the probe batch, on every rank, whatever the TP layout."""
    from megatron.core.tensor_parallel import (
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    x = _probe()
    with torch.no_grad():
        y, _ = model(scatter_to_sequence_parallel_region(x) if sequence_parallel else x)
        return gather_from_sequence_parallel_region(y) if sequence_parallel else y


def _sharded_state_dict(model):
    # A bare MLP is not a top-level model: give it the metadata GPTModel would pass down.
    return model.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))


def _save_tp2(ckpt_dir: str) -> torch.Tensor:
    initialize(tp=2, seed=21, device="cpu")
    model = swiglu_mlp(tiny_config(tp=2, sequence_parallel=True))
    start_write_results_queue()
    dist_checkpointing.save(_sharded_state_dict(model), ckpt_dir)
    return _full_output(model, sequence_parallel=True)


def _load(ckpt_dir: str, tp: int) -> torch.Tensor:
    initialize(tp=tp, seed=999, device="cpu")  # a different seed: the weights must come from the checkpoint
    model = swiglu_mlp(tiny_config(tp=tp))
    before = _full_output(model, sequence_parallel=False)
    model.load_state_dict(dist_checkpointing.load(_sharded_state_dict(model), ckpt_dir))
    after = _full_output(model, sequence_parallel=False)
    assert not torch.allclose(before, after)
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    return after


def test_save_at_tp2_loads_at_tp1(tmp_path):
    ckpt = str(tmp_path)
    saved = spawn(_save_tp2, 2, ckpt)
    torch.testing.assert_close(saved[0], saved[1])
    (loaded,) = spawn(_load, 1, ckpt, 1)
    torch.testing.assert_close(loaded, saved[0])
    # And back onto 2 ranks.
    for out in spawn(_load, 2, ckpt, 2):
        torch.testing.assert_close(out, saved[0])
