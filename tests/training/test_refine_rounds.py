"""The trainer's rollout rounds (refine.mini_batches > 1): a round's rollouts serve its steps, the first of which
is on-policy and the others clip against it; configs that would checkpoint inside a round are refused."""

import pytest

from megatron_refine.runtime import spawn


def _train(corpus, *extra):
    from megatron_refine.training import load_config, train

    cfg = load_config("tiny-deltanet", [
        f"data.path={corpus}", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
        "optimizer.warmup_steps=0", "optimizer.lr=3e-2", "logging.log_interval=100", "device=cpu",
        "stage=refine-mid", "refine.n_chunks=2", "refine.margin=5", "refine.k=3", *extra])
    return [(h["ppo_ratio_mean"], h["approx_kl"], h["time_rollout"]) for h in train(cfg).refine_history]


def test_trainer_runs_rollout_rounds_over_mini_batches(corpus):
    # DP=2, two rounds of two steps: each round's first step is on-policy, its second clips against the round.
    history = spawn(_train, 2, corpus, "train_steps=4", "refine.mini_batches=2")[0]
    assert len(history) == 4
    for step, (ratio, kl, rollout_s) in enumerate(history):
        if step % 2 == 0:
            assert ratio == pytest.approx(1, abs=1e-6) and kl == pytest.approx(0, abs=1e-9) and rollout_s > 0
        else:
            assert abs(ratio - 1) > 1e-4 and kl > 0 and rollout_s == 0


@pytest.mark.parametrize("extra, message", [
    (["refine.every=2"], r"refine.mini_batches=2 runs a rollout round .* set refine.every=1"),
    (["train_steps=3"], r"train_steps \(3\) must be a multiple of refine.mini_batches \(2\)"),
    (["train_steps=4", "checkpoint.save_interval=3"], r"checkpoint.save_interval \(3\) must be a multiple"),
])
def test_rounds_never_straddle_a_checkpoint(extra, message):
    from megatron_refine.training import load_config

    with pytest.raises(ValueError, match=message):
        load_config("tiny-deltanet", ["stage=refine-mid", "refine.mini_batches=2", "train_steps=4", *extra])
