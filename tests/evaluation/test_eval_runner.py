"""`megatron-refine eval`: packed batched decoding equals decoding each prompt alone, TP=2 equals TP=1, the
intervals are Wilson's, and the command runs end to end on a trained checkpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_modules import TINY_MODELS, tiny_fast_weight_model

from megatron_refine.evaluation.scoring import confidence_interval, generate_packed, summarize
from megatron_refine.runtime import initialize, spawn

EOS = 5  # a frequent id of the tiny random model, so some rows stop early


def _packed_equals_alone(name):
    from megatron_refine.models import generate

    initialize(seed=3, device="cpu")
    model = tiny_fast_weight_model(name, params_dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (7, 30, 19, 41, 3)]
    budgets = [6, 12, 1, 9, 12]
    packed = generate_packed(model, prompts, budgets, EOS)
    for prompt, budget, got in zip(prompts, budgets, packed):
        alone = generate(model, torch.tensor([prompt]), budget, greedy=True)[0].tolist()
        want = alone[: alone.index(EOS) + 1] if EOS in alone else alone
        assert got == want
    return packed


@pytest.mark.parametrize("name", TINY_MODELS)
def test_packed_batch_decodes_each_prompt_as_alone(name):
    spawn(_packed_equals_alone, 1, name)


def _packed_at_tp(root, tp, sp):
    """One set of weights (saved at TP=1, loaded resharded at TP=2): the packed decode of three prompts."""
    from megatron.core import dist_checkpointing

    initialize(tp=tp, seed=3, device="cpu")
    model = tiny_fast_weight_model("lact_tiny", sequence_parallel=sp).eval()
    path = Path(root)
    if tp == 1:
        from megatron_refine.training.checkpointing import start_write_results_queue

        start_write_results_queue()
        dist_checkpointing.save(model.sharded_state_dict(), str(path))
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (9, 26, 17)]
    return generate_packed(model, prompts, [8, 8, 8], None)


def test_tp2_with_sequence_parallelism_decodes_as_tp1(tmp_path):
    (root := tmp_path / "w").mkdir()
    reference = spawn(_packed_at_tp, 1, str(root), 1, False)[0]
    for out in spawn(_packed_at_tp, 2, str(root), 2, True):
        assert out == reference


def test_wilson_interval_and_summary_rows():
    # Wilson, 5 of 10 at z = 1.96: centre (0.5 + 1.9208/10) / 1.38416 = 0.5, half 1.96 sqrt(0.025 + 0.009604) / 1.38416
    low, high = confidence_interval([1.0] * 5 + [0.0] * 5)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert confidence_interval([0.0] * 4)[0] == 0 and confidence_interval([1.0] * 4)[1] == 1
    rows = summarize([{"task": "a", "length": 8, "score": 1.0}, {"task": "a", "length": 16, "score": 0.0},
                      {"task": "b", "length": 8, "score": 0.5}])
    assert [(r["task"], r["length"], r["n"], r["score"]) for r in rows] == [
        ("a", 8, 1, 1.0), ("a", 16, 1, 0.0), ("a", "all", 2, 0.5), ("b", 8, 1, 0.5)]


def test_a_task_file_takes_its_first_samples_and_never_a_negative_count(tmp_path):
    """--samples -1 sliced the file from its end (7 of 8 scored); the parser refuses it, as does examples_for."""
    from megatron_refine.data import ByteTokenizer
    from megatron_refine.evaluation.runner import examples_for

    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps({"task": "qa", "prompt": f"p{i}", "answer": "a", "metric": "exact_match",
                                        "max_new_tokens": 2}) + "\n" for i in range(8)))
    assert [len(examples_for([], [], n, ByteTokenizer(), 0, str(data), 100)[0]) for n in (0, 3)] == [8, 3]
    with pytest.raises(ValueError, match=r"--samples must be >= 0 \(0: all of a task file\), got -1"):
        examples_for([], [], -1, ByteTokenizer(), 0, str(data), 100)


def test_eval_command_end_to_end(tmp_path):
    from megatron_refine.data import write_builtin_corpus

    root = Path(__file__).parents[2]
    write_builtin_corpus(tmp_path / "data", 40, seed=0, shard_size=20, progress=False)
    train = [sys.executable, "-m", "megatron_refine.cli", "train", "--config", "tiny-deltanet", "--set",
             f"data.path={tmp_path / 'data'}", "--set", "data.seq_length=64", "--set", "train_steps=1", "--set",
             "device=cpu", "--set", f"checkpoint.save={tmp_path / 'ckpt'}", "--set", "optimizer.warmup_steps=0"]
    assert subprocess.run(train, cwd=root, capture_output=True, text=True).returncode == 0
    command = [sys.executable, "-m", "megatron_refine.cli", "eval", "--load", str(tmp_path / "ckpt"), "--tasks",
               "niah_single,niah_multivalue", "--lengths", "768,1024", "--samples", "3", "--out-dir",
               str(tmp_path / "eval"), "--nproc", "2", "--set", "device=cpu"]
    run = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "niah_single" in run.stdout and "95% interval" in run.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(results["examples"]) == 2 * 2 * 3  # tasks x lengths x samples, split over 2 DP ranks and gathered
    assert {(r["task"], r["length"]) for r in results["summary"]} >= {("niah_single", 768), ("niah_multivalue", 1024)}
    assert (tmp_path / "eval" / "results.csv").read_text().startswith("task,length,n,score,ci_low,ci_high")


def test_eval_takes_the_checkpoints_training_dtype_on_cuda():
    """On CUDA eval loads the model in bf16 when it trained so (the default there), as `eval --ttt`'s trainer does;
    on a CPU in fp32."""
    from megatron_refine.training.model_loading import checkpoint_bf16

    for saved, on_cuda in ((None, True), (True, True), (False, False)):
        common = {"config": {"bf16": saved}}
        assert checkpoint_bf16(common, cuda=True) is on_cuda
        assert checkpoint_bf16(common, cuda=False) is False
