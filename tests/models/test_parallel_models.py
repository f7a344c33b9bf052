"""The fast-weight models under Megatron parallelism, against TP=1 / PP=1 with the same global weights.

Weights (and gradients) travel between layouts through megatron-core dist checkpoints, so these tests also
cover `sharded_state_dict` resharding of the fused projections.
"""

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron_modules import TINY_MODELS, tiny_fast_weight_model, token_batch

from megatron_refine.models import get_layer_spec
from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import start_write_results_queue

B, T = 2, 24


def _save(model, path):
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True)
    torch.distributed.barrier()
    start_write_results_queue()
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def _load(model, path):
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))


def _loss_and_grads(model, ids):
    """Mean LM loss on ids [B, T+1] (labels = next tokens); gradients as finalize_model_grads leaves them."""
    loss = model(ids[:, :T], None, None, labels=ids[:, 1:]).mean()
    loss.backward()
    # What Megatron's finalize_model_grads sums over TP: SP-marked weights, and attention's q / k norms
    # (qk_layernorm), which each TP rank applies to its own heads.
    c = model.config
    for n, p in model.named_parameters():
        summed = (c.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
            c.qk_layernorm and ("q_layernorm" in n or "k_layernorm" in n))
        if summed and p.grad is not None and parallel_state.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    return loss.detach()


def _grads_into_params(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))


def _reference(name, root):
    """TP=1: logits, loss; weights saved to root/w, gradients saved (as a checkpoint) to root/g."""
    initialize(seed=11, device="cpu")
    model = tiny_fast_weight_model(name)
    ids = token_batch(B, T + 1, seed=1)
    with torch.no_grad():
        logits = model(ids[:, :T], None, None)
    loss = _loss_and_grads(model, ids)
    _save(model, root / "w")
    _grads_into_params(model)
    _save(model, root / "g")
    return logits, loss


def _tensor_parallel(name, root, sequence_parallel):
    initialize(tp=2, seed=12, device="cpu")
    model = tiny_fast_weight_model(name, sequence_parallel=sequence_parallel)
    _load(model, root / "w")
    ids = token_batch(B, T + 1, seed=1)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(ids[:, :T], None, None))
    loss = _loss_and_grads(model, ids)
    # The reference gradients, resharded to TP=2 through the checkpoint, must equal ours shard by shard.
    expected = tiny_fast_weight_model(name, sequence_parallel=sequence_parallel)
    _load(expected, root / "g")
    for (n, p), e in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p.grad, e, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {n}: {m}")
    return logits, loss


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_tp2_equals_tp1_outputs_and_gradients(name, sequence_parallel, tmp_path):
    ref_logits, ref_loss = spawn(_reference, 1, name, tmp_path)[0]
    for logits, loss in spawn(_tensor_parallel, 2, name, tmp_path, sequence_parallel):
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loss, ref_loss)


def _pipeline(name, root):
    initialize(pp=2, seed=13, device="cpu")
    model = tiny_fast_weight_model(name)
    _load(model, root / "w")
    ids = token_batch(B, T + 1, seed=1)[:, :T]
    shape = (T, B, model.config.hidden_size)
    # Each stage builds its half of the layers, each with its own mixer (a hybrid's pattern split between stages).
    half = model.config.num_layers // 2
    stage = parallel_state.get_pipeline_model_parallel_rank()
    kinds = [type(layer.self_attention) for layer in model.decoder.layers]
    mixers = model.config.layer_mixers[stage * half:(stage + 1) * half]
    assert kinds == [get_layer_spec(m).submodules.self_attention.module for m in mixers], (kinds, mixers)
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            assert model.pre_process and not model.post_process
            torch.distributed.send(model(ids, None, None).contiguous(), dst=1)
            return None
        hidden = torch.empty(shape)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        return model(ids, None, None)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_pp2_forward_equals_pp1(name, tmp_path):
    ref_logits, _ = spawn(_reference, 1, name, tmp_path)[0]
    _, logits = spawn(_pipeline, 2, name, tmp_path)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)


def _save_at_tp2(name, root):
    initialize(tp=2, seed=14, device="cpu")
    model = tiny_fast_weight_model(name, sequence_parallel=True)
    _save(model, root / "tp2")
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(token_batch(B, T, seed=2), None, None))


def _load_at_tp1(name, root):
    initialize(seed=15, device="cpu")
    model = tiny_fast_weight_model(name)
    _load(model, root / "tp2")
    with torch.no_grad():
        return model(token_batch(B, T, seed=2), None, None)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_dist_checkpoint_saved_at_tp2_loads_at_tp1_with_identical_logits(name, tmp_path):
    saved = spawn(_save_at_tp2, 2, name, tmp_path)
    (loaded,) = spawn(_load_at_tp1, 1, name, tmp_path)
    torch.testing.assert_close(loaded, saved[0], atol=1e-5, rtol=1e-4)
