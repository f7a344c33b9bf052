"""The REFINE gradient path: rollouts branched from one forward equal explicit prefix re-runs; choosing the
positions from that forward's own logits equals a separate selection pass; parallel layouts of a REFINE step
agree."""

import pytest
import torch
from megatron_modules import TINY_MODELS, assert_gradients_close, tiny_fast_weight_model, token_batch

from megatron_refine.models.packing import packed_seq_params
from megatron_refine.refine import RefineConfig, refine_loss, roll_out
from megatron_refine.models.losses import vocab_parallel_log_probs
from megatron_refine.runtime import initialize, spawn

T = 64


def _branched_equals_rerun(name):
    initialize(seed=4, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64)
    ids = token_batch(2, T, seed=3)
    positions = torch.tensor([[7, 30, 41], [12, 19, 50]])
    cfg = RefineConfig(k=4, n=2)
    out = model.forward_with_branch_states(ids)
    rollouts = roll_out(model, out, positions, cfg, torch.Generator().manual_seed(0))
    weights = torch.randn(rollouts.log_probs.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = list(model.parameters())
    grads = torch.autograd.grad((rollouts.log_probs * weights).sum(), params, allow_unused=True)

    # Explicitly: for every rollout row, re-run prefix + rollout and read the rollout tokens' log-probs.
    rows = [(b, p) for b in range(2) for p in positions[b].tolist() for _ in range(cfg.n)]
    rerun = []
    for r, (b, p) in enumerate(rows):
        seq = torch.cat([ids[b, : p + 1], rollouts.tokens[r, :-1]])[None]
        logits = model(seq, None, None)[0, p:]  # predictions of rollout tokens 1..k
        rerun.append(vocab_parallel_log_probs(logits, rollouts.tokens[r]))
    rerun = torch.stack(rerun)
    torch.testing.assert_close(rollouts.log_probs, rerun, atol=1e-10, rtol=1e-8)
    ref_grads = torch.autograd.grad((rerun * weights).sum(), params, allow_unused=True)
    assert_gradients_close(model, grads, ref_grads)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_rollout_log_probs_and_gradients_equal_an_explicit_rerun_of_each_prefix(name):
    spawn(_branched_equals_rerun, 1, name)


def _rollouts_read_nothing_on_the_host(device):
    from host_reads import HostReads

    from megatron_refine.kernels import set_debug_checks

    initialize(seed=2, device=device)
    model = tiny_fast_weight_model("deltanet_tiny").to(device)
    set_debug_checks(False)  # the value checks' default on CUDA
    ids = token_batch(2, T, seed=5).to(device)
    positions = torch.tensor([[7, 30, 41], [12, 19, 50]], device=device)
    out = model.forward_with_branch_states(ids)
    cfg = RefineConfig(k=4, n=2)
    roll = lambda: roll_out(model, out, positions, cfg, torch.Generator(device).manual_seed(0), eos_id=3)  # noqa: E731
    with HostReads() as seen:
        roll()
    assert not seen.calls, seen.calls
    if device == "cuda":  # the real thing: any stream synchronisation raises
        roll()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            roll()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_rollouts_branch_decode_and_score_without_reading_the_device(device):
    """DeltaNet: reading the branch states, the k - 1 decode steps of every rollout and the scoring forward make
    no host read (on CUDA: no stream synchronisation), so the GPU never waits for the host inside the loop."""
    spawn(_rollouts_read_nothing_on_the_host, 1, device)


def _one_forward_equals_two_passes(name, packed, tp):
    import megatron_refine.refine.step as step

    initialize(tp=tp, seed=3, device="cpu")
    torch.set_num_threads(1)  # bitwise equality of two forwards: see tests/refine/test_ppo_mini_batches.py
    model = tiny_fast_weight_model(name, sequence_parallel=tp > 1, params_dtype=torch.float64)
    params = list(model.parameters())
    ids = token_batch(2, T + 1, seed=4)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    packing = packed_seq_params(torch.tensor([0, 20, 64, 100, 128])) if packed else None
    cfg = RefineConfig(n_chunks=3, margin=6, k=3, n=2)
    real_select = step.select

    def run(separate_pass: bool):
        chosen = []

        def select(logits, *args, **kwargs):
            if separate_pass:  # the step as it was: a no-grad forward of its own chooses the positions
                with torch.no_grad():
                    logits = model(tokens, None, None, packed_seq_params=packing)
            chosen.append(real_select(logits, *args, **kwargs))
            return chosen[-1]

        step.select = select
        try:
            loss, metrics = refine_loss(model, tokens, labels, cfg, torch.Generator().manual_seed(0),
                                        packed_seq_params=packing)
        finally:
            step.select = real_select
        return loss, metrics, chosen[0], torch.autograd.grad(loss, params, allow_unused=True)

    (loss, metrics, chosen, grads), (ref_loss, ref_metrics, ref_chosen, ref_grads) = run(False), run(True)
    for mine, theirs in zip(chosen, ref_chosen):  # positions, their entropies, validity
        assert torch.equal(mine, theirs)
    assert loss.item() == ref_loss.item()
    for key in ("reward_mean", "reward_std", "selected_entropy", "rollout_tokens", "logprob_diff_max"):
        assert metrics[key].item() == ref_metrics[key].item(), key
    assert_gradients_close(model, grads, ref_grads, rel=1e-13)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("packed, tp", [(False, 1), (True, 2)], ids=["unpacked", "packed-tp2-sp"])
def test_positions_chosen_from_the_training_forward_equal_a_separate_selection_pass(name, packed, tp):
    """One forward per step: its detached logits choose the positions, and the states after them are read from
    its chunk states afterwards. Positions, rewards, loss and gradients equal those of a separate no-grad
    selection forward (the step before issue 18), packed or not, under TP=2 + sequence parallelism."""
    spawn(_one_forward_equals_two_passes, tp, name, packed, tp)


def _refine_grads(tp, root):
    """A REFINE loss on 2 documents, all-reduced the way DDP would: loss and flattened full gradients."""
    from megatron.core import parallel_state

    initialize(tp=tp, seed=6, device="cpu")
    model = tiny_fast_weight_model("deltanet_tiny")
    from megatron.core import dist_checkpointing

    from megatron_refine.training.checkpointing import start_write_results_queue

    if tp == 1 and not (root / "w").exists():
        (root / "w").mkdir()
        start_write_results_queue()
        dist_checkpointing.save(model.sharded_state_dict(), str(root / "w"))
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(root / "w")))
    ids = token_batch(2, T + 1, seed=8)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = ids.chunk(dp)[rank]
    cfg = RefineConfig(n_chunks=3, margin=6, k=3)
    # The same documents get the same generator whichever rank holds them.
    loss, metrics = refine_loss(model, mine[:, :-1], mine[:, 1:], cfg, torch.Generator().manual_seed(11 + rank))
    loss.backward()
    return loss.item(), metrics["reward_mean"].item()


def test_tp2_refine_step_equals_tp1(tmp_path):
    (ref_loss, ref_reward), = spawn(_refine_grads, 1, 1, tmp_path)
    for loss, reward in spawn(_refine_grads, 2, 2, tmp_path):
        assert abs(loss - ref_loss) < 1e-5 and abs(reward - ref_reward) < 1e-5


def _kl_to_a_copy_is_zero():
    from megatron_refine.models import frozen_copy

    initialize(seed=9, device="cpu")
    model = tiny_fast_weight_model("lact_tiny")
    reference = frozen_copy(model)
    ids = token_batch(2, T + 1, seed=2)
    cfg = RefineConfig(n_chunks=2, margin=6, k=3, n=2, kl_coef=0.5, reward="hybrid")
    loss, metrics = refine_loss(model, ids[:, :-1], ids[:, 1:], cfg, torch.Generator().manual_seed(0), reference)
    loss.backward()
    assert metrics["kl"].item() == 0.0 and metrics["rollout_tokens"].item() == 2 * 2 * 2 * 3
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_k3_kl_to_an_identical_reference_is_zero_and_the_loss_backpropagates():
    spawn(_kl_to_a_copy_is_zero, 1)
