"""The GPU defaults end to end (skipped without CUDA): bf16 parameters, the distributed optimizer, REFINE
sampling with a CUDA generator, save, exact resume, and --finetune keeping the loaded weights."""

import pytest
import torch

from megatron_refine.runtime import spawn
from megatron_refine.training import load_config, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(corpus, root, steps, *extra):
    cfg = load_config("tiny-deltanet", [
        f"data.path={corpus}", "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=2",
        "optimizer.warmup_steps=0", "logging.log_interval=100", "device=cuda", f"train_steps={steps}",
        f"checkpoint.save={root}", "stage=refine-mid", "refine.every=2", "refine.n_chunks=2", "refine.margin=5",
        "refine.k=3", "deterministic=true", *extra,
    ])
    result = train(cfg)
    assert next(result.model.parameters()).dtype == torch.bfloat16
    return result.losses, {n: p.detach().float().cpu() for n, p in result.model.named_parameters()}


def test_refine_training_on_cuda_saves_and_resumes_exactly(tmp_path):
    from megatron_refine.data import write_builtin_corpus

    write_builtin_corpus(tmp_path / "data", 40, seed=0, shard_size=10, progress=False)
    full, saved = spawn(_train, 1, tmp_path / "data", tmp_path / "a", 4)[0]
    spawn(_train, 1, tmp_path / "data", tmp_path / "b", 4, "exit_interval=2")
    resumed, _ = spawn(_train, 1, tmp_path / "data", tmp_path / "b", 4, f"checkpoint.load={tmp_path / 'b'}")[0]
    assert resumed == full[2:]
    _, tuned = spawn(_train, 1, tmp_path / "data", tmp_path / "c", 1, f"checkpoint.load={tmp_path / 'a'}",
                     "checkpoint.finetune=true", "optimizer.lr=1e-7", "optimizer.min_lr=1e-8")[0]
    for name, p in saved.items():  # one step of lr 1e-7 from the loaded weights, not from random ones
        torch.testing.assert_close(tuned[name], p, rtol=1e-2, atol=1e-2, msg=lambda m: f"{name}: {m}")
