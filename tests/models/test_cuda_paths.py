"""CUDA paths (skipped without CUDA): Transformer-Engine spec vs local spec, and fla's kernels, in bf16."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron_modules import VOCAB, token_batch

from megatron_refine.models import build_model, get_config
from megatron_refine.models.specs import te_available
from megatron_refine.runtime import initialize, spawn
from megatron_refine.training.checkpointing import load_model_weights, start_write_results_queue

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _bf16_model(name, use_te):
    config = get_config(name, params_dtype=torch.bfloat16, bf16=True, hidden_size=128, num_attention_heads=2)
    return build_model(config, VOCAB, use_te=use_te).cuda()


def _te_matches_local(name, root):
    initialize(seed=1, device="cuda")
    local = _bf16_model(name, use_te=False)
    start_write_results_queue()
    dist_checkpointing.save({"model": local.sharded_state_dict()}, str(root))
    te = _bf16_model(name, use_te=True)
    load_model_weights(root, te)  # TE's _extra_state is absent from the local-spec checkpoint
    ids = token_batch(2, 128 + 1).cuda()
    losses = []
    for model in (local, te):
        loss = model(ids[:, :-1], None, None, labels=ids[:, 1:]).float().mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    for (n, a), b in zip(local.named_parameters(), te.parameters()):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=5e-2, rtol=5e-2, msg=lambda m: f"{n}: {m}")


@pytest.mark.skipif(not te_available(), reason="needs Transformer Engine")
@pytest.mark.parametrize("name", ["deltanet_tiny", "lact_tiny", "hybrid_tiny"])
def test_te_spec_matches_local_spec_in_bf16(name, tmp_path):
    spawn(_te_matches_local, 1, name, tmp_path)


def _fla_path_matches_reference():
    from megatron_refine.kernels import delta_rule

    initialize(seed=2, device="cuda")
    model = _bf16_model("deltanet_tiny", use_te=False)
    ids = token_batch(2, 256).cuda()
    logits = model(ids, None, None)  # DeltaNetMixer -> delta_rule -> fla's chunk_delta_rule (bf16 on CUDA)
    import megatron_refine.models.deltanet as deltanet

    deltanet.delta_rule = lambda *a, **k: delta_rule(*a, **k, use_reference=True)
    reference = model(ids, None, None)
    torch.testing.assert_close(logits.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_deltanet_model_with_fla_kernels_matches_reference_path_in_bf16():
    spawn(_fla_path_matches_reference, 1)


def _hybrid_branches_continue_the_forward():
    initialize(seed=3, device="cuda")
    model = _bf16_model("hybrid_tiny", use_te=False)  # fla's gated kernel, SDPA attention, bf16
    ids = token_batch(2, 256).cuda()
    positions = torch.tensor([[10, 100, 200], [5, 150, 240]]).cuda()
    with torch.no_grad():
        out = model.forward_with_branch_states(ids)
        rows = [(b, p) for b in range(2) for p in positions[b].tolist()]
        continuation = torch.stack([ids[b, p + 1 : p + 6] for b, p in rows])
        logits, _ = model.forward_from_cache(continuation, out.states_after(positions))
        expected = torch.stack([out.logits[b, p + 1 : p + 6] for b, p in rows])
    vocab = slice(0, VOCAB)
    torch.testing.assert_close(logits[..., vocab].float(), expected[..., vocab].float(), atol=5e-2, rtol=5e-2)


def test_hybrid_branches_continue_the_forward_in_bf16():
    """Gated DeltaNet states from fla's kernel and attention's shared prefix keys and values, on CUDA in bf16."""
    spawn(_hybrid_branches_continue_the_forward, 1)


def _packed_fla_path_matches_reference():
    from megatron_refine.kernels import delta_rule
    from megatron_refine.models.packing import packed_seq_params

    initialize(seed=3, device="cuda")
    model = _bf16_model("deltanet_tiny", use_te=False)
    ids = token_batch(2, 256).cuda()
    params = packed_seq_params(torch.tensor([0, 40, 41, 256, 300, 512], device="cuda"))
    logits = model(ids, None, None, packed_seq_params=params)  # fla's varlen chunk_delta_rule
    import megatron_refine.models.deltanet as deltanet

    deltanet.delta_rule = lambda *a, **k: delta_rule(*a, **k, use_reference=True)
    reference = model(ids, None, None, packed_seq_params=params)
    torch.testing.assert_close(logits.float(), reference.float(), atol=5e-2, rtol=5e-2)


def test_packed_deltanet_with_fla_varlen_matches_reference_path_in_bf16():
    spawn(_packed_fla_path_matches_reference, 1)
