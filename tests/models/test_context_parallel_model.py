"""The models under context parallelism (CP 2, and CP 4 for the packed hybrid; gloo, fp64) equal one rank running
whole rows: logits, the states read after positions anywhere in a piece (a decoding step from them), and every
gradient, for DeltaNet, Gated DeltaNet and the hybrid (attention's keys and values gathered); batched rows, and packed
documents that cross a piece boundary, start at one or lie inside a piece. LaCT refuses CP."""

import pytest
import torch
from megatron.core import parallel_state
from megatron_modules import tiny_fast_weight_model, token_batch

from megatron_refine.models import get_config
from megatron_refine.models.packing import packed_seq_params
from megatron_refine.runtime import initialize, spawn

B, T = 2, 32  # pieces of 16 at CP 2, of 8 at CP 4
# row 0: [0, 5), [5, 17) (crosses the boundaries at 8 and 16), [17, 32) (crosses 24);
# row 1: [32, 48) (ends at a boundary), [48, 50), [50, 64)
CU_SEQLENS = [0, 5, 17, 32, 48, 50, 64]


def _offsets(cp):
    """Positions in each piece: a conv window reaching into the previous piece, the piece's last token."""
    return [1, T // cp - 1]


def _run(model, ids, cu, positions, weights):
    """Logits of ids [B, L] and of one decoding step from the states after positions [B, P]; the loss of both
    (fixed weights) backpropagated. Returns (logits, step logits, gradients)."""
    params = None if cu is None else packed_seq_params(torch.tensor(cu))
    out = model.forward_with_branch_states(ids, params)
    cache = out.states_after(positions)
    b = torch.arange(ids.shape[0])[:, None]
    step_logits, _ = model.step(ids[b, positions].flatten(), cache)  # [B P, V]
    w_logits, w_step = weights
    loss = (out.logits * w_logits).sum() + (step_logits * w_step).sum()
    loss.backward()
    return out.logits.detach(), step_logits.detach(), [p.grad.clone() for p in model.parameters()]


def _weights(vocab, cp, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, vocab, generator=g, dtype=torch.float64),
            torch.randn(B, cp, len(_offsets(cp)), vocab, generator=g, dtype=torch.float64))


def _reference(name, cu, cp):
    initialize(seed=3, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64)
    ids = token_batch(B, T, seed=2)
    # [B, cp P]: every piece's positions
    positions = torch.tensor([[r * T // cp + o for r in range(cp) for o in _offsets(cp)]] * B)
    w_logits, w_step = _weights(model.vocab_size, cp)
    logits, step, grads = _run(model, ids, cu, positions, (w_logits, w_step.flatten(0, 2)))
    return model.state_dict(), logits, step.view(B, cp, len(_offsets(cp)), -1), grads


def _context_parallel(name, cu, cp, reference):
    state, logits_ref, step_ref, grads_ref = reference
    initialize(cp=cp, seed=3, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64, context_parallel_size=cp)
    model.load_state_dict(state)
    r, L = parallel_state.get_context_parallel_rank(), T // cp
    ids = token_batch(B, T, seed=2)[:, r * L:(r + 1) * L]
    positions = torch.tensor([_offsets(cp)] * B)  # this piece's
    w_logits, w_step = _weights(model.vocab_size, cp)
    logits, step, grads = _run(model, ids, cu, positions, (w_logits[:, r * L:(r + 1) * L], w_step[:, r].flatten(0, 1)))
    torch.testing.assert_close(logits, logits_ref[:, r * L:(r + 1) * L])
    torch.testing.assert_close(step, step_ref[:, r].flatten(0, 1))
    for (n, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref):
        torch.distributed.all_reduce(g, group=parallel_state.get_context_parallel_group())  # DDP's sum over CP
        torch.testing.assert_close(g, g_ref, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("cu", [None, CU_SEQLENS], ids=["rows", "packed"])
@pytest.mark.parametrize("name", ["deltanet_tiny", "gated_deltanet_tiny", "hybrid_tiny"])
def test_cp2_equals_one_rank(name, cu):
    (reference,) = spawn(_reference, 1, name, cu, 2)
    spawn(_context_parallel, 2, name, cu, 2, reference)


def test_cp4_equals_one_rank():
    """Four pieces of 8: the state passes through two middle ranks, documents cross several boundaries."""
    (reference,) = spawn(_reference, 1, "hybrid_tiny", CU_SEQLENS, 4)
    spawn(_context_parallel, 4, "hybrid_tiny", CU_SEQLENS, 4, reference)


def test_lact_refuses_context_parallelism():
    with pytest.raises(ValueError, match="context_parallel_size=2 with lact layers: LaCT's fast-weight update .* not "
                                         "affine"):
        get_config("lact_tiny", context_parallel_size=2)
