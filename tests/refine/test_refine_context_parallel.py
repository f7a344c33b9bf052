"""REFINE under context parallelism (CP 2, and CP 4 for the packed hybrid; gloo, fp64) equals one rank: the positions
drawn over the whole rows, each rolled out on the rank that holds it (a chunk straddles the piece boundary, so the
ranks hold unequal shares), the sampled rollouts, rewards, every metric, the loss and every gradient, with the KL to a
frozen reference; DeltaNet and the hybrid, rows and packed documents; and a rollout round with a PPO update on its
stored rollouts."""

import pytest
import torch
from megatron.core import parallel_state
from megatron_modules import tiny_fast_weight_model, token_batch

from megatron_refine.models import frozen_copy
from megatron_refine.models.packing import packed_seq_params
from megatron_refine.refine import RefineConfig, ppo_update_loss, refine_loss, rollout_round
from megatron_refine.runtime import initialize, spawn

B, T = 2, 48  # pieces of 24
CFG = RefineConfig(n_chunks=3, k=3, margin=4, n=2, selection="entropy", temperature=1.0, kl_coef=0.1)
CU_SEQLENS = [0, 20, 48, 60, 96]  # row 0: a document crossing the boundary at 24; row 1: one starting inside piece 0


def _step(model, cu, rounds, lengths=None):
    """An on-policy REFINE step, or (rounds) a rollout round's rollouts and a PPO update on them; backpropagated.
    lengths [B]: where positions may lie (`refine_loss`'s)."""
    ids = token_batch(B, T + 1, seed=6)
    params = None if cu is None else packed_seq_params(torch.tensor(cu))
    generator, reference = torch.Generator().manual_seed(4), frozen_copy(model)
    stored = None
    if rounds:
        stored = rollout_round(model, ids[:, :-1], ids[:, 1:], CFG, generator, params)
        loss, metrics = ppo_update_loss(model, ids[:, :-1], ids[:, 1:], stored, CFG, reference, params)
        stored = (stored.positions, stored.tokens, stored.old_log_probs, stored.advantages, stored.mask)
    else:
        loss, metrics = refine_loss(model, ids[:, :-1], ids[:, 1:], CFG, generator, ref_model=reference,
                                    packed_seq_params=params, lengths=lengths)
    loss.backward()
    metrics = {name: v.item() for name, v in metrics.items() if not name.startswith("time_")}
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()], stored


def _reference(name, cu, rounds, lengths=None):
    initialize(seed=8, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64)
    state = model.state_dict()  # the weights: a backward does not change them
    return state, *_step(model, cu, rounds, lengths)


def _context_parallel(name, cu, rounds, reference, lengths=None, cp=2):
    state, loss_ref, metrics_ref, grads_ref, stored_ref = reference
    initialize(cp=cp, seed=8, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64, context_parallel_size=cp)
    model.load_state_dict(state)
    loss, metrics, grads, stored = _step(model, cu, rounds, lengths)
    if rounds:  # every CP rank stores the round's R rows, as one rank does
        for x, x_ref in zip(stored, stored_ref):
            torch.testing.assert_close(x, x_ref)
    group = parallel_state.get_context_parallel_group()
    torch.distributed.all_reduce(loss, group=group)  # each rank's share of the rows' loss
    torch.testing.assert_close(loss, loss_ref)
    assert metrics.keys() == metrics_ref.keys()  # fp32 where the losses are (mean_loss sums in fp32)
    for name, value in metrics.items():
        assert value == pytest.approx(metrics_ref[name], rel=1e-6, abs=1e-7), (name, value, metrics_ref[name])
    assert metrics["rollout_tokens"] == metrics_ref["rollout_tokens"]
    for (n, _), g, g_ref in zip(model.named_parameters(), grads, grads_ref):
        torch.distributed.all_reduce(g, group=group)  # DDP's sum over CP (Megatron scales the loss by CP)
        torch.testing.assert_close(g, g_ref, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("cu", [None, CU_SEQLENS], ids=["rows", "packed"])
@pytest.mark.parametrize("name", ["deltanet_tiny", "hybrid_tiny"])
def test_refine_at_cp2_equals_one_rank(name, cu):
    (reference,) = spawn(_reference, 1, name, cu, False)
    spawn(_context_parallel, 2, name, cu, False, reference)


def test_rollout_round_and_ppo_update_at_cp2_equal_one_rank():
    """refine.mini_batches > 1: the round's stored rollouts (positions, tokens, old log-probs, advantages, mask) and a
    PPO update on them, packed documents of the hybrid."""
    (reference,) = spawn(_reference, 1, "hybrid_tiny", CU_SEQLENS, True)
    spawn(_context_parallel, 2, "hybrid_tiny", CU_SEQLENS, True, reference)


def test_a_rank_whose_piece_holds_no_position_still_takes_the_step():
    """Rows whose real labels end inside the first piece (`lengths`): every position lies on rank 0; rank 1 decodes
    nothing, still draws the same numbers, and the step equals one rank's."""
    lengths = torch.tensor([20, 22])
    (reference,) = spawn(_reference, 1, "hybrid_tiny", None, False, lengths)
    spawn(_context_parallel, 2, "hybrid_tiny", None, False, reference, lengths)


def test_refine_at_cp4_equals_one_rank():
    """Four pieces of 12, three positions: some rank holds none, documents cross several boundaries."""
    (reference,) = spawn(_reference, 1, "hybrid_tiny", CU_SEQLENS, False)
    spawn(_context_parallel, 4, "hybrid_tiny", CU_SEQLENS, False, reference, cp=4)
