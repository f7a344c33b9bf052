"""`megatron-refine eval --ttt`: a batch's result equals `train --stage ttt` on its prompts then `eval`; reset batch
restores weights and optimizer state bitwise, never carries them over; DP=2 and TP=2 equal one rank."""

import json
import subprocess
import sys

import pytest
import torch
from prompt_data import pretrain_tiny, write_qa

from megatron_refine.runtime import spawn
from megatron_refine.training import load_config

SEQ = 128
SMALL = ["optimizer.lr=1e-3", "refine.n_chunks=2", "refine.margin=5", "refine.k=3", "logging.log_interval=100"]
GREEDY = ["refine.selection=argmax", "refine.temperature=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain_tiny(tmp_path_factory.mktemp("pretrained"), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pretrained_hybrid(tmp_path_factory):
    """A tiny Gated DeltaNet + attention hybrid."""
    return pretrain_tiny(tmp_path_factory.mktemp("hybrid"), tmp_path_factory.mktemp("corpus"), "hybrid_tiny")


def _args(load, data, out, *sets, ttt="refine", reset="batch", tp=1):
    from megatron_refine.evaluation.runner import EvalArgs
    from megatron_refine.evaluation.ttt import ttt_fields

    return EvalArgs(load=load, data=data, samples=0, out_dir=str(out), device="cpu", ttt_reset=reset,
                    tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                    **ttt_fields(ttt, [*SMALL, f"data.seq_length={SEQ}", *sets]))


def _predictions(out):
    return [(r["prediction"], r["score"]) for r in json.loads((out / "results.json").read_text())["examples"]]


def _train_then_eval(load, data, out, *sets):
    from megatron_refine.evaluation.runner import EvalArgs, run
    from megatron_refine.training import train

    cfg = load_config("ttt-refine", [f"data.path={data}", f"checkpoint.load={load}", "checkpoint.finetune=true",
                                     "model.config=deltanet_tiny", "device=cpu", f"checkpoint.save={out / 'ckpt'}",
                                     f"data.seq_length={SEQ}", *SMALL, *sets])
    train(cfg)
    torch.distributed.destroy_process_group()
    run(EvalArgs(load=str(out / "ckpt"), data=data, samples=0, out_dir=str(out / "eval"), device="cpu"))


def test_ttt_on_a_batch_equals_train_stage_ttt_then_eval(pretrained, tmp_path):
    from megatron_refine.evaluation.runner import run

    data = write_qa(tmp_path / "qa.jsonl", n=8)
    lines = open(data).readlines()  # one prompt too short for a rollout (margin 5): NTP alone, counted
    open(data, "w").writelines([json.dumps({**json.loads(lines[0]), "prompt": "abc def ?"}) + "\n", *lines[1:]])
    spawn(run, 1, _args(pretrained, data, tmp_path / "ttt"))
    spawn(_train_then_eval, 1, pretrained, data, tmp_path)
    assert _predictions(tmp_path / "ttt") == _predictions(tmp_path / "eval")
    assert json.loads((tmp_path / "ttt" / "results.json").read_text())["config"]["ttt_prompts_without_refine"] == 1
    no_ttt = _predictions(tmp_path / "ttt" / "no-ttt")
    assert no_ttt != _predictions(tmp_path / "ttt")  # TTT at lr 1e-3 changed the answers


def test_ttt_refine_refuses_prompts_all_too_short_for_a_rollout(pretrained, tmp_path):
    """They got reward 0 and PG 0, an NTP update labelled "TTT refine"; the table says how many, when some are."""
    from megatron_refine.data import ByteTokenizer
    from megatron_refine.evaluation.examples import EvalExample
    from megatron_refine.evaluation.ttt import ttt_config, write_ttt_results

    def example(prompt):
        return EvalExample(task="qa", prompt=prompt, answers=["a"], max_new_tokens=4, metric="exact_match")

    args = _args(pretrained, None, tmp_path)
    with pytest.raises(ValueError, match=r"every prompt is at most 11 tokens, too short for a REFINE rollout "
                                         r"\(refine.margin=5 .*use --ttt ntp, or --set refine.margin=M"):
        ttt_config(args, [example("abc def ?")] * 8, ByteTokenizer())
    ttt_config(args, [example("abc def ?")] * 7 + [example("a longer prompt of 24 ?")], ByteTokenizer())
    rows = [{"task": "qa", "length": None, "score": 1.0}]
    table = write_ttt_results(tmp_path, rows, rows, {"ttt": "refine", "ttt_reset": "batch",
                                                     "ttt_prompts_without_refine": 7})
    assert "TTT refine (reset batch, 7 NTP only)" in table


def test_ttt_config_is_the_typed_config_on_the_checkpoints_model(pretrained, tmp_path):
    """`--set` is parsed once at the edge; inside, the given config keeps its values, takes the checkpoint's model
    and eval's layout, and sizes rows to the prompts only when data.seq_length was not given."""
    from dataclasses import replace

    from megatron_refine.data import ByteTokenizer
    from megatron_refine.evaluation.examples import EvalExample
    from megatron_refine.evaluation.ttt import ttt_config

    examples = [EvalExample(task="qa", prompt="x" * 100 + " ?", answers=["a"], max_new_tokens=4, metric="exact_match")]
    args = _args(pretrained, None, tmp_path, "optimizer.lr=2e-3", "model.config=lact_tiny", "prompt_update=ntp")
    cfg = ttt_config(args, examples * 8, ByteTokenizer())
    assert (cfg.optimizer.lr, cfg.data.seq_length, cfg.logging.log_interval, cfg.train_steps) == (2e-3, SEQ, 100, 2)
    assert (cfg.model.config, cfg.checkpoint.load, cfg.checkpoint.finetune) == ("deltanet_tiny", pretrained, True)
    sized = ttt_config(replace(args, ttt_fit_rows=False, ttt_log_per_batch=True), examples * 8, ByteTokenizer())
    assert (sized.data.seq_length, sized.logging.log_interval) == (SEQ, 2)
    fitted = ttt_config(replace(args, ttt_fit_rows=True), examples * 8, ByteTokenizer())
    assert fitted.data.seq_length == 192  # 102 prompt tokens + 32 answer tokens, rounded up to 64
    assert args.ttt_config.data.seq_length == SEQ  # the given config is replaced, never changed in place


def _reset_policies(load, data, root):
    from megatron_refine.data import ByteTokenizer
    from megatron_refine.evaluation.runner import examples_for
    from megatron_refine.evaluation.ttt import TrainingState, run_test_time_training
    from megatron_refine.runtime import initialize
    from megatron_refine.training.trainer import train_step

    runtime = initialize(device="cpu")
    examples = examples_for([], [], 0, ByteTokenizer(), 0, data=data, max_prompt_tokens=10_000)[0]
    runs = {}
    for reset in ("batch", "never"):
        args = _args(load, data, root, "prompt_update=ntp", reset=reset)  # no draws: the batches repeat exactly
        run = run_test_time_training(args, examples + examples, ByteTokenizer(), runtime)
        runs[reset] = run
    state = {reset: TrainingState.capture(run.trainer) for reset, run in runs.items()}
    # after a restore: everything bitwise as captured (weights, Adam moments and steps, main weights, scheduler)
    trainer = runs["never"].trainer
    before = TrainingState.capture(trainer)
    train_step(trainer, [trainer.loader.next_batch()], 99)
    before.restore(trainer)
    after = TrainingState.capture(trainer)
    same = all(torch.equal(a, b) for a, b in zip(before.weights, after.weights))
    for (g1, m1, s1), (g2, m2, s2) in zip(before.optimizers, after.optimizers):
        same &= all(torch.equal(a, b) for x, y in zip(m1, m2) for a, b in zip(x, y))
        same &= s1.keys() == s2.keys() and all(torch.equal(s1[p][k], s2[p][k]) for p in s1 for k in s1[p])
        same &= [{k: v for k, v in g.items()} for g in g1] == [{k: v for k, v in g.items()} for g in g2]
    same &= before.scheduler_steps == after.scheduler_steps
    adam = {reset: {int(s["step"]) for o in s_.optimizers for s in o[2].values()} for reset, s_ in state.items()}
    weights = {reset: s.weights for reset, s in state.items()}
    return ({reset: [(r["prediction"], r["ttt_batch"]) for r in run.results] for reset, run in runs.items()},
            adam, same, any(not torch.equal(a, b) for a, b in zip(weights["batch"], weights["never"])))


def test_reset_batch_restores_the_state_and_never_carries_it_over(pretrained, tmp_path):
    data = write_qa(tmp_path / "qa.jsonl", n=8)
    predictions, adam, restored, differ = spawn(_reset_policies, 1, pretrained, data, tmp_path)[0]
    batch = predictions["batch"]
    assert [b for _, b in batch] == [0] * 8 + [1] * 8
    assert [p for p, _ in batch[:8]] == [p for p, _ in batch[8:]]  # the same prompts from the same start
    assert adam == {"batch": {2}, "never": {4}}  # Adam's moments restarted, or carried over the stream
    assert restored and differ


def _partial_and_layout(load, data, out, tp, *sets):
    from megatron_refine.evaluation.runner import run

    return run(_args(load, data, out, *sets, tp=tp))


@pytest.mark.parametrize("nproc, tp", [(2, 1), (2, 2)], ids=["dp2", "tp2-sp"])
def test_ttt_on_two_ranks_equals_one(pretrained, tmp_path, nproc, tp):
    data = write_qa(tmp_path / "qa.jsonl", n=10)  # a partial last batch of 2, answered
    spawn(_partial_and_layout, 1, pretrained, data, tmp_path / "one", 1, *GREEDY)
    spawn(_partial_and_layout, nproc, pretrained, data, tmp_path / "two", tp, *GREEDY,
          *(["data.micro_batch_size=2"] if tp == 1 else []))
    one, two = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
    assert len(one) == 10 and one == two


@pytest.mark.parametrize("nproc, tp", [(2, 1), (2, 2)], ids=["dp2", "tp2-sp"])
def test_ttt_on_a_hybrid_on_two_ranks_equals_one(pretrained_hybrid, tmp_path, nproc, tp):
    """Test-time REFINE on a Gated DeltaNet + attention hybrid: the same answers on two ranks as on one."""
    data = write_qa(tmp_path / "qa.jsonl", n=6)
    spawn(_partial_and_layout, 1, pretrained_hybrid, data, tmp_path / "one", 1, *GREEDY)
    spawn(_partial_and_layout, nproc, pretrained_hybrid, data, tmp_path / "two", tp, *GREEDY,
          *(["data.micro_batch_size=2"] if tp == 1 else []))
    one, two = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
    assert len(one) == 6 and one == two


def test_cli_ttt_prints_the_table_beside_no_ttt(pretrained, tmp_path):
    data = write_qa(tmp_path / "qa.jsonl", n=8)
    run = subprocess.run(
        [sys.executable, "-m", "megatron_refine.cli", "eval", "--load", pretrained, "--data", data, "--samples", "0",
         "--ttt", "ntp", "--ttt-reset", "never", "--set", "device=cpu", "--set", "optimizer.lr=1e-3",
         "--set", f"data.seq_length={SEQ}", "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no TTT" in run.stdout and "TTT ntp (reset never)" in run.stdout
    assert (tmp_path / "out" / "results.csv").is_file() and (tmp_path / "out" / "no-ttt" / "results.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "megatron_refine.cli", "eval", "--load", pretrained, "--data", data,
                          "--set", "optimizer.lr=1e-3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "with --ttt refine or ntp" in bad.stderr
