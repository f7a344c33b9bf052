"""The NTP trainer on gloo: parallel layouts agree, resume is exact, checkpoints are atomic, NaN steps skip."""

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_refine.data import Batch
from megatron_refine.runtime import RankFailed, spawn
from megatron_refine.training import load_config, save_checkpoint, setup, train, train_step
from megatron_refine.training.checkpointing import MARKER, latest_iteration

SEQ = 32


def _config(corpus, *extra):
    return load_config("tiny-deltanet", [
        f"data.path={corpus}", f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=4",
        "optimizer.warmup_steps=0", "optimizer.lr=3e-3", "logging.log_interval=100", "device=cpu", *extra,
    ])


def _global_batches(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (4, SEQ + 1), generator=g) for _ in range(steps)]


def _my_micro_batches(trainer, global_batch):
    """This DP rank's micro-batches of a global batch [4, SEQ+1] (rank-major, as the loader shards)."""
    dp, rank = trainer.runtime.layout.data_parallel_size, torch.distributed.get_rank() // (
        trainer.runtime.world_size // trainer.runtime.layout.data_parallel_size)
    mine = global_batch.chunk(dp)[rank]
    return [Batch(m[:, :-1], m[:, 1:], cu_seqlens=_documents(m.shape[0])) for m in mine.chunk(trainer.num_microbatches)]


def _documents(rows):
    """Two packed documents per row, split at 11 or 20: every layout below also checks document resets."""
    return torch.tensor([0] + [x for b in range(rows) for x in (b * SEQ + (11 if b % 2 == 0 else 20), (b + 1) * SEQ)])


def _steps(corpus, layout, root, load=None):
    # One thread in every layout: PyTorch's CPU attention kernel splits its work by the thread count and rounds
    # accordingly, and the launcher gives one rank 2 threads, two ranks 1 each (Adam then amplifies the rounding of
    # near-zero gradients into a 1e-4 difference of the third step's gradient norm).
    torch.set_num_threads(1)
    cfg = _config(corpus, *layout, *(["checkpoint.load=" + load, "checkpoint.finetune=true"] if load else []))
    assert cfg.stage == "pretrain" or cfg.refine.every == 1
    trainer = setup(cfg)
    if load is None:  # the reference run publishes its initial weights for the other layouts
        save_checkpoint(root, 0, trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {})
    # One global batch three times: the loss must fall (the steps learn), and every layout must agree.
    results = [train_step(trainer, _my_micro_batches(trainer, b)) for b in _global_batches(1) * 3]
    return [(r.loss, r.grad_norm) for r in results]


# REFINE steps with draws that do not depend on how documents are split over ranks: argmax positions and
# greedy rollouts (sampling reproducibility is covered by the resume test).
REFINE = ["stage=refine-mid", "refine.every=1", "refine.n_chunks=2", "refine.margin=5", "refine.k=3",
          "refine.selection=argmax", "refine.temperature=0"]
# Across TP layouts (one DP rank, so the same seeded draws): sampled positions and rollouts. An argmax over the
# near-flat entropies and logits of a barely trained model flips on float rounding, which differs between TP
# layouts; a sampled draw moves only if its uniform lands within rounding of a bucket edge.
REFINE_SAMPLED = [*REFINE[:-2], "refine.selection=entropy", "refine.temperature=1"]
HYBRID = "model.config=hybrid_tiny"


@pytest.mark.parametrize("layout, nproc, common", [
    (["parallel.tensor_model_parallel_size=1"], 2, []),  # DP=2
    (["parallel.tensor_model_parallel_size=2"], 2, []),  # TP=2
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2, []),  # TP=2 + SP
    (["parallel.pipeline_model_parallel_size=2"], 2, []),  # PP=2 (pipeline schedule on gloo)
    (["parallel.tensor_model_parallel_size=1"], 2, REFINE),  # REFINE steps, DP=2
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2, REFINE_SAMPLED),  # TP=2 + SP
    # A hybrid (Gated DeltaNet and attention layers): its rollouts branch from both kinds of layer.
    (["parallel.tensor_model_parallel_size=1"], 2, [*REFINE, HYBRID]),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2, [*REFINE_SAMPLED, HYBRID]),
    # Each row in two pieces (its documents cross the boundary): the fast-weight state, the short convolutions and
    # attention's keys and values pass between the CP ranks.
    (["parallel.context_parallel_size=2"], 2, []),  # CP=2
    (["parallel.context_parallel_size=2"], 2, [HYBRID]),
    (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
     4, [HYBRID]),  # CP=2 x TP=2 + SP
    # REFINE: positions drawn over the whole rows, each rolled out on the rank that holds it.
    (["parallel.context_parallel_size=2"], 2, REFINE_SAMPLED),
    (["parallel.context_parallel_size=2"], 2, [*REFINE_SAMPLED, HYBRID]),
    (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
     4, [*REFINE_SAMPLED, HYBRID]),
], ids=["dp2", "tp2", "tp2-sp", "pp2", "refine-dp2", "refine-tp2-sp", "refine-dp2-hybrid", "refine-tp2-sp-hybrid",
        "cp2", "cp2-hybrid", "cp2-tp2-sp-hybrid", "refine-cp2", "refine-cp2-hybrid", "refine-cp2-tp2-sp-hybrid"])
def test_parallel_training_steps_match_one_rank(corpus, tmp_path, layout, nproc, common):
    (reference,) = spawn(_steps, 1, corpus, common, tmp_path)
    for steps in spawn(_steps, nproc, corpus, [*common, *layout], tmp_path, str(tmp_path)):
        for (loss, norm), (ref_loss, ref_norm) in zip(steps, reference):
            assert math.isclose(loss, ref_loss, rel_tol=1e-5), (steps, reference)
            assert math.isclose(norm, ref_norm, rel_tol=1e-4), (steps, reference)
    assert reference[-1][0] < reference[0][0]


def _train(corpus, root, steps, load, *extra):
    cfg = _config(corpus, f"train_steps={steps}", f"checkpoint.save={root}", "optimizer.warmup_steps=2",
                  *([f"checkpoint.load={root}"] if load else []), *extra)
    result = train(cfg)
    return result.losses, {n: p.detach().clone() for n, p in result.model.named_parameters()}


DISTRIBUTED_OPTIMIZER = "optimizer.use_distributed_optimizer=true"  # the GPU default


@pytest.mark.parametrize("optimizer", [[], [DISTRIBUTED_OPTIMIZER]], ids=["optimizer", "distributed-optimizer"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, optimizer):
    full_losses, full_params = spawn(_train, 2, corpus, tmp_path / "a", 6, False, *optimizer)[0]
    spawn(_train, 2, corpus, tmp_path / "b", 6, False, "exit_interval=3", *optimizer)  # stops after step 3's save
    resumed_losses, resumed_params = spawn(_train, 2, corpus, tmp_path / "b", 6, True, *optimizer)[0]
    assert len(resumed_losses) == 3
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses[3:]), rtol=1e-5, atol=1e-6)
    for name, p in full_params.items():
        torch.testing.assert_close(resumed_params[name], p, rtol=1e-5, atol=1e-6)
    assert latest_iteration(tmp_path / "b") == 6


def _steps_after_resume(corpus, root, *extra):
    """Two steps on fixed global batches after loading `root` (optimizer state included, or weights only)."""
    trainer = setup(_config(corpus, f"checkpoint.load={root}", *extra))
    results = [train_step(trainer, _my_micro_batches(trainer, b)) for b in _global_batches(2, seed=1)]
    return [r.loss for r in results], {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def test_distributed_optimizer_state_resumes_at_another_data_parallel_size(corpus, tmp_path):
    """Saved at DP=2 (megatron-core's dp_reshardable format), resumed at DP=1: the Adam moments come back, so
    the next steps equal those of a DP=2 resume; a weights-only load (fresh moments) differs."""
    spawn(_train, 2, corpus, tmp_path, 3, False, DISTRIBUTED_OPTIMIZER)
    at_dp2 = spawn(_steps_after_resume, 2, corpus, tmp_path, DISTRIBUTED_OPTIMIZER)[0]
    at_dp1 = spawn(_steps_after_resume, 1, corpus, tmp_path, DISTRIBUTED_OPTIMIZER)[0]
    fresh = spawn(_steps_after_resume, 1, corpus, tmp_path, DISTRIBUTED_OPTIMIZER, "checkpoint.finetune=true")[0]
    torch.testing.assert_close(torch.tensor(at_dp1[0]), torch.tensor(at_dp2[0]), rtol=1e-5, atol=1e-6)
    for name, p in at_dp2[1].items():
        torch.testing.assert_close(at_dp1[1][name], p, rtol=1e-5, atol=1e-6)
    assert max((fresh[1][n] - p).abs().max().item() for n, p in at_dp2[1].items()) > 1e-4


def _finetune_bf16(corpus, root, *extra):
    """--finetune into bf16 parameters with Megatron's mixed-precision optimizer (fp32 main weights)."""
    from megatron_refine.training.checkpointing import checkpoint_dir, load_model_weights

    trainer = setup(_config(corpus, f"checkpoint.load={root}", "checkpoint.finetune=true", "bf16=true",
                            "optimizer.lr=1e-6", "optimizer.min_lr=1e-7", *extra))
    assert next(trainer.module.parameters()).dtype == torch.bfloat16
    saved = setup(_config(corpus)).module  # fp32, given the checkpoint's weights
    load_model_weights(checkpoint_dir(root, latest_iteration(root)), saved)
    assert not train_step(trainer, [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]).skipped
    for (name, p), q in zip(trainer.module.named_parameters(), saved.parameters()):
        # A step of lr 1e-6 moves nothing past bf16 rounding; one from the random initial weights would.
        torch.testing.assert_close(p.float(), q, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("optimizer", [[], [DISTRIBUTED_OPTIMIZER]], ids=["mixed-precision", "distributed-optimizer"])
def test_finetune_in_bf16_keeps_the_loaded_weights(corpus, tmp_path, optimizer):
    spawn(_train, 1, corpus, tmp_path, 3, False, "optimizer.lr=3e-2")  # weights far from the initial ones
    spawn(_finetune_bf16, 1, corpus, tmp_path, *optimizer)


def _crash_during_save(corpus, root):
    import megatron_refine.training.checkpointing as checkpointing

    trainer = setup(_config(corpus))
    train_step(trainer, [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)])
    save_checkpoint(root, 1, trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {})
    real_save = checkpointing.dist_checkpointing.save

    def dies_halfway(state, path, **kw):
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    checkpointing.dist_checkpointing.save = dies_halfway
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 2, trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {})
    checkpointing.dist_checkpointing.save = real_save
    assert (root / MARKER).read_text() == "1" and not (root / "iter_0000002").exists()
    fresh = setup(_config(corpus, f"checkpoint.load={root}"))
    assert fresh.start_step == 1
    # The next save clears the leftover and completes.
    save_checkpoint(root, 2, trainer.module, trainer.optimizer, trainer.scheduler, trainer.loader, {})
    assert latest_iteration(root) == 2 and not (root / "iter_0000002.tmp").exists()


def test_a_crash_during_a_checkpoint_write_leaves_latest_on_the_previous_one(corpus, tmp_path):
    spawn(_crash_during_save, 1, corpus, tmp_path)


def _nan_step(corpus):
    from megatron_modules import nan_losses

    trainer = setup(_config(corpus))
    batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    with nan_losses():
        result = train_step(trainer, batches)
    assert result.skipped and math.isnan(result.loss)
    for n, p in trainer.module.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not train_step(trainer, batches).skipped


def test_a_nan_loss_skips_the_update(corpus):
    spawn(_nan_step, 1, corpus)


def _setup(cfg):
    setup(cfg)


def test_bad_input_fails_before_any_step(corpus, tmp_path):
    with pytest.raises(RankFailed, match="does not exist: run `megatron-refine preprocess`"):
        spawn(_setup, 1, _config(str(tmp_path / "missing")))
    with pytest.raises(RankFailed, match="global_batch_size 5 must be a multiple of micro_batch_size"):
        spawn(_setup, 1, _config(corpus, "data.global_batch_size=5"))
    with pytest.raises(RankFailed, match=r"warmup_steps \(2\) must be smaller than the decay steps \(1"):
        spawn(_train, 1, corpus, tmp_path / "ck", 1, False)
    spawn(_train, 1, corpus, tmp_path / "ck", 3, False)
    meta = json.loads((Path(corpus) / "metadata.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for shard in meta["shards"]:
        (other / shard["name"]).write_bytes((Path(corpus) / shard["name"]).read_bytes())
    (other / "metadata.json").write_text(json.dumps({**meta, "vocab_size": 300}))
    with pytest.raises(RankFailed, match="tokenizer of 257 tokens, the data has 300"):
        spawn(_setup, 1, _config(str(other), f"checkpoint.load={tmp_path / 'ck'}"))


def test_refine_stage_rejects_pipeline_parallelism_and_short_sequences(corpus):
    with pytest.raises(RankFailed, match="REFINE steps need the whole model on one pipeline stage"):
        spawn(_setup, 2, _config(corpus, "stage=refine-mid", "parallel.pipeline_model_parallel_size=2"))
    with pytest.raises(RankFailed, match=r"data.seq_length \(32\) must be >= 48"):
        spawn(_setup, 1, _config(corpus, "stage=refine-mid"))


def _refine_run(corpus, root, steps, load, *extra):
    return _train(corpus, root, steps, load, *REFINE[:1], "refine.every=2", "refine.n_chunks=2", "refine.margin=5",
                  "refine.k=3", *extra)


def test_refine_with_kl_to_the_starting_model_trains(corpus, tmp_path):
    losses, _ = spawn(_refine_run, 1, corpus, tmp_path, 3, False, "refine.kl_coef=0.1")[0]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_refine_mid_training_resumes_exactly(corpus, tmp_path):
    full_losses, full_params = spawn(_refine_run, 2, corpus, tmp_path / "a", 4, False)[0]
    spawn(_refine_run, 2, corpus, tmp_path / "b", 4, False, "exit_interval=2")
    resumed_losses, resumed_params = spawn(_refine_run, 2, corpus, tmp_path / "b", 4, True)[0]
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(full_losses[2:]), rtol=1e-5, atol=1e-6)
    for name, p in full_params.items():
        torch.testing.assert_close(resumed_params[name], p, rtol=1e-5, atol=1e-6)


def test_config_yaml_and_set_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  config: lact_tiny\noptimizer:\n  lr: 0.01\ntrain_steps: 7\n")
    cfg = load_config(str(path), ["optimizer.lr=2e-3", "model.overrides.num_layers=3"])
    assert (cfg.model.config, cfg.optimizer.lr, cfg.train_steps, cfg.model.overrides) == ("lact_tiny", 2e-3, 7, {"num_layers": 3})
    assert load_config(None, ["optimizer.min_lr=1e-5"]).optimizer.min_lr == 1e-5  # YAML 1.1 reads 1e-5 as a string
    with pytest.raises(ValueError, match="optimizer.lr expects a float, got 'fast'"):
        load_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ValueError, match=r"unknown config keys \['optimizer.learning_rate'\]"):
        load_config(None, ["optimizer.learning_rate=1"])
    with pytest.raises(ValueError, match="neither a YAML file nor one of"):
        load_config("no-such-config")


def _deterministic_refine_run(corpus):
    cfg = _config(corpus, "train_steps=3", "deterministic=true", *REFINE[:-2], "refine.n_chunks=2")
    result = train(cfg)
    from megatron_refine.refine import STEP_PHASES

    timing = {f"time_{phase}" for phase in STEP_PHASES} | {"time_update", "rollout_tokens_per_s"}
    return result.losses, [{k: v for k, v in r.items() if k not in timing} for r in result.refine_history]


def test_deterministic_refine_runs_repeat_bitwise(corpus):
    """`--deterministic`: the same 3 REFINE steps (entropy sampling, sampled rollouts) twice, in fresh
    processes: identical losses and REFINE metrics, to the bit."""
    first, = spawn(_deterministic_refine_run, 1, corpus)
    second, = spawn(_deterministic_refine_run, 1, corpus)
    assert len(first[0]) == 3 and len(first[1]) == 3
    assert first == second


def _eod_masked_loss(corpus):
    from megatron_refine.models import packed_seq_params

    trainer = setup(_config(corpus, "data.eod_mask_loss=true"))
    batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
    while not any((b.loss_mask == 0).any() for b in batches):  # a document ends in this step's batches
        batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
    with torch.no_grad():  # at initialisation every token's loss is about log V: spread them so the mask matters
        trainer.module.output_layer.weight.normal_(0, 1)
    expected, unmasked = [], []
    with torch.no_grad():
        for b in batches:
            per_token = trainer.module(b.tokens, None, None, labels=b.labels,
                                       packed_seq_params=packed_seq_params(b.cu_seqlens))
            expected.append(((per_token * b.loss_mask).sum() / b.loss_mask.sum()).item())
            unmasked.append(per_token.mean().item())
    loss = train_step(trainer, batches).loss
    return loss, sum(expected) / len(expected), sum(unmasked) / len(unmasked)


def test_eod_mask_loss_leaves_out_the_token_after_each_document(corpus):
    loss, expected, unmasked = spawn(_eod_masked_loss, 1, corpus)[0]
    assert math.isclose(loss, expected, rel_tol=1e-6) and not math.isclose(loss, unmasked, rel_tol=1e-5)


def _lact_steps(corpus, root, load, *extra):
    cfg = load_config("tiny-lact", [
        f"data.path={corpus}", f"data.seq_length={SEQ}", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=0", "logging.log_interval=100", "device=cpu", "train_steps=1",
        f"checkpoint.save={root / 'out'}",
        DISTRIBUTED_OPTIMIZER, *([f"checkpoint.load={root}"] if load else []), *extra])
    return train(cfg).losses


def test_distributed_optimizer_state_of_another_parameter_order_is_refused(corpus, tmp_path):
    """A LaCT checkpoint from before its input projections were fused (no parameter list recorded) has its
    distributed-optimizer state in the old order: resuming is refused with the fix, finetune loads the weights."""
    from megatron_refine.megatron_compat import COMMON_STATE_FILE
    from megatron_refine.training.checkpointing import checkpoint_dir

    spawn(_lact_steps, 1, corpus, tmp_path, False, f"checkpoint.save={tmp_path}")
    common_file = checkpoint_dir(tmp_path, 1) / COMMON_STATE_FILE
    common = torch.load(common_file, weights_only=False)
    assert common.pop("parameter_names")[0].startswith("embedding.")
    torch.save(common, common_file)
    (common_file.parent / "checksums.sha256").unlink()  # as then: checksums came later
    with pytest.raises(RankFailed, match="before LaCT's input projections were fused.*checkpoint.finetune=true"):
        spawn(_lact_steps, 1, corpus, tmp_path, True, "train_steps=2")
    assert len(spawn(_lact_steps, 1, corpus, tmp_path, True, "train_steps=2", "checkpoint.finetune=true")[0]) == 2
