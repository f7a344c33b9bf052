"""The DeltaNet model with its mixers on fla's kernels (fp16 on a CPU, Triton's interpreter) against the same
model on the PyTorch path: the training forward and backward (batched, packed), branch states with their
gradients (what a REFINE step backpropagates through), a continuation from them, and prefill. Branch states and
continuation also on a hybrid: Gated DeltaNet layers on fla's gated kernel beside attention layers."""

import functools
import sys

import pytest
import torch
from conftest import assert_close_fp16
from megatron_modules import VOCAB, token_batch

import megatron_refine.models.deltanet as deltanet
from megatron_refine.kernels import delta_rule, gated_delta_rule
from megatron_refine.kernels.delta_rule import fla_path
from megatron_refine.models import build_model, get_config, packed_seq_params

T = 96
CU_SEQLENS = torch.tensor([0, 30, 31, 80, 96])


@pytest.fixture
def model(megatron):
    config = get_config("deltanet_tiny", num_attention_heads=2, params_dtype=torch.float16, fp16=True,
                        use_cpu_initialization=True)  # 2 heads: half the interpreted programs
    return build_model(config, VOCAB)


@pytest.fixture
def hybrid(megatron):
    """Gated DeltaNet, attention, Gated DeltaNet, attention."""
    config = get_config("hybrid_tiny", params_dtype=torch.float16, fp16=True, use_cpu_initialization=True)
    return build_model(config, VOCAB)


@pytest.fixture
def pytorch_path(monkeypatch):
    """Inside the block every DeltaNet and Gated DeltaNet mixer runs the PyTorch path, as off CUDA."""
    def use(on: bool):
        for name, rule in (("delta_rule", delta_rule), ("gated_delta_rule", gated_delta_rule)):
            monkeypatch.setattr(deltanet, name, functools.partial(rule, use_reference=True) if on else rule)
    return use


def calls_to_fla(monkeypatch, kernel: str = "fla_chunk_delta_rule"):
    """Counts the calls of fla's chunk_delta_rule (or `kernel`), from both modules that call it."""
    counted, real = [], getattr(fla_path, kernel)()
    for module in (fla_path, sys.modules["megatron_refine.kernels.delta_rule"]):
        monkeypatch.setattr(module, kernel, lambda: lambda *a, **k: counted.append(1) or real(*a, **k))
    return counted


def loss_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, run, pytorch_path, monkeypatch, kernel: str = "fla_chunk_delta_rule"):
    counted = calls_to_fla(monkeypatch, kernel)
    fla = loss_and_grads(model, run)
    assert counted, "the fla path was not taken"
    pytorch_path(True)
    reference = loss_and_grads(model, run)
    assert_close_fp16(fla[0], reference[0], "loss")
    assert fla[1].keys() == reference[1].keys()
    for name in reference[1]:
        assert_close_fp16(fla[1][name], reference[1][name], name, scale=5)


@pytest.mark.parametrize("packed", [False, True])
def test_training_forward_and_backward(model, packed, pytorch_path, monkeypatch):
    ids = token_batch(1 if packed else 2, T + 1)
    params = packed_seq_params(CU_SEQLENS) if packed else None

    def run():
        return model(ids[:, :-1], None, None, labels=ids[:, 1:], packed_seq_params=params).float().mean()

    compare(model, run, pytorch_path, monkeypatch)


def branch_and_continue(model, packed, pytorch_path, monkeypatch, kernel="fla_chunk_delta_rule"):
    ids = token_batch(1 if packed else 2, T, seed=1)
    params = packed_seq_params(CU_SEQLENS) if packed else None
    positions = torch.tensor([[29, 40, 79]]) if packed else torch.tensor([[10, 70], [64, 3]])
    rollout = token_batch(positions.numel(), 4, seed=2)

    def run():
        out = model.forward_with_branch_states(ids, params)
        logits, _ = model.forward_from_cache(rollout, out.states_after(positions))
        vocab = slice(0, VOCAB)  # the rest: the vocabulary's padding (-inf)
        return out.logits[..., vocab].float().logsumexp(-1).mean() + logits[..., vocab].float().logsumexp(-1).mean()

    compare(model, run, pytorch_path, monkeypatch, kernel)


@pytest.mark.parametrize("packed", [False, True])
def test_branch_states_and_continuation(model, packed, pytorch_path, monkeypatch):
    """REFINE's gradient path: rollouts scored from the states after chosen positions, into the prefix."""
    branch_and_continue(model, packed, pytorch_path, monkeypatch)


def test_hybrid_branch_states_and_continuation(hybrid, pytorch_path, monkeypatch):
    """The same on a hybrid (packed, documents across the chunks): Gated DeltaNet states on fla's gated kernel,
    attention's shared prefix keys and values."""
    branch_and_continue(hybrid, True, pytorch_path, monkeypatch, "fla_chunk_gated_delta_rule")


@pytest.mark.parametrize("packed", [False, True])
def test_prefill_from_final_states(model, packed, pytorch_path, monkeypatch):
    """Prefill's logits and decoding states (fla's varlen final states) equal the branch states after the last
    tokens on the PyTorch path, and the first decoding step from them agrees."""
    ids = token_batch(1 if packed else 2, T, seed=3)
    params = packed_seq_params(CU_SEQLENS) if packed else None
    last = (CU_SEQLENS[1:] - 1)[None] if packed else torch.full((2, 1), T - 1)
    counted = calls_to_fla(monkeypatch)
    logits, cache = model.prefill(ids, params)
    assert counted
    step, _ = model.step(token_batch(1, cache.num_rows, seed=4)[0], cache)
    pytorch_path(True)
    with torch.no_grad():
        out = model.forward_with_branch_states(ids, params)
        b = torch.arange(last.shape[0])[:, None]
        ref_logits, ref_cache = out.logits[b, last].flatten(0, 1), out.states_after(last)
        ref_step, _ = model.step(token_batch(1, cache.num_rows, seed=4)[0], ref_cache)
    assert_close_fp16(logits[:, :VOCAB], ref_logits[:, :VOCAB], "logits")  # the rest: the vocabulary's padding
    assert torch.equal(cache.positions, ref_cache.positions)
    for number, layer in ref_cache.layers.items():
        assert_close_fp16(cache.layers[number].state, layer.state, f"layer {number} state")
    assert_close_fp16(step[:, :VOCAB], ref_step[:, :VOCAB], "first step's logits")


@pytest.mark.parametrize("packed", [False, True])
def test_branch_states_read_the_positions_once_for_all_layers(model, packed):
    """fla's varlen calls need host lengths: the positions (and cu_seqlens) are read once per positions tensor,
    not once per layer; reading the same positions again reads nothing."""
    from host_reads import HostReads

    from megatron_refine.kernels import set_debug_checks

    set_debug_checks(False)  # the value checks' default on CUDA
    ids = token_batch(1 if packed else 2, T, seed=5)
    params = packed_seq_params(CU_SEQLENS) if packed else None
    positions = torch.tensor([[29, 40, 79]]) if packed else torch.tensor([[10, 70], [64, 3]])
    try:
        with torch.no_grad():
            out = model.forward_with_branch_states(ids, params)
            with HostReads() as first:
                cache = out.states_after(positions)
            with HostReads() as again:
                out.states_after(positions)
    finally:
        set_debug_checks(None)
    assert len(cache.layers) == model.config.num_layers == 2
    assert first.calls["tolist"] == (2 if packed else 1), first.calls
    # fla derives its chunk indices from the host lengths we pass (cu_seqlens_cpu): host work, no device read,
    # once per chained call (2 here), kept by fla's tensor cache for the next layer
    assert set(first.calls) <= {"tolist", "repeat_interleave without output_size"}, first.calls
    assert first.calls["repeat_interleave without output_size"] <= 2, first.calls
    assert not again.calls, again.calls
