"""The paper's mid-training presets: every value as in ../shared/specs/refine-algorithm.md (the Qwen3.5 ones too), YAML
round trip, the dry run at full size, a tiny override that trains, weight decay on norms and biases as an option, and
the Qwen3.5 model presets built on the meta device with the estimator's parameter count."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_refine.runtime import spawn
from megatron_refine.training import load_config

# The spec's figures: the release's optimizer and the mid-training data and batch.
RELEASE = {
    "optimizer.lr": 1e-6, "optimizer.min_lr": 1e-6, "optimizer.warmup_steps": 0,
    "optimizer.lr_decay_style": "constant", "optimizer.weight_decay": 0.01, "optimizer.adam_beta1": 0.9,
    "optimizer.adam_beta2": 0.999, "optimizer.clip_grad": 1.0, "optimizer.decay_norms_and_biases": True,
    "bf16": True, "data.seq_length": 16384, "data.layout": "documents", "data.min_document_tokens": None,
}
REFINE = {
    "stage": "refine-mid", "refine.every": 1, "refine.mini_batches": 4, "refine.n_chunks": 8, "refine.k": 5,
    "refine.n": 1, "refine.temperature": 1.0, "refine.top_p": 1.0, "refine.selection": "entropy",
    "refine.margin": 20, "refine.reward": "cosine", "refine.eps_low": 0.2, "refine.eps_high": 0.2,
    "refine.dual_clip": 3.0, "refine.sft_coef": 1.0, "refine.ppo_coef": 0.2, "refine.kl_coef": 0.0,
    "refine.detach_prefix": False,
}
PRESETS = {
    "refine-mid-deltanet-1p3b": ("deltanet_1p3b", {**RELEASE, **REFINE}),
    "refine-mid-lact-760m": ("lact_760m", {**RELEASE, **REFINE}),
    "ntp-mid-deltanet-1p3b": ("deltanet_1p3b", {**RELEASE, "stage": "pretrain"}),
    "ntp-mid-lact-760m": ("lact_760m", {**RELEASE, "stage": "pretrain"}),
    # the same protocol on Qwen3.5's text models (hybrids)
    **{f"{stage}-mid-qwen3-5-{size}": (f"qwen3_5_{size}", {**RELEASE, **values})
       for stage, values in (("refine", REFINE), ("ntp", {"stage": "pretrain"}))
       for size in ("0p8b", "2b", "4b", "9b")},
}
QWEN3_5_VOCAB = 248320


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("name", PRESETS)
def test_preset_values_are_the_papers(name, tmp_path):
    model, expected = PRESETS[name]
    cfg = load_config(name)
    assert cfg.model.config == model
    for key, value in expected.items():
        assert _get(cfg, key) == value, key
    # 128 documents per rollout round, in optimizer steps of 32 (the NTP baseline: the same 32 a step)
    assert cfg.data.global_batch_size == 32
    assert cfg.stage == "pretrain" or cfg.data.global_batch_size * cfg.refine.mini_batches == 128
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(tmp_path / "c.yaml")).to_dict() == cfg.to_dict()


def test_dry_run_resolves_the_full_size_preset():
    run = subprocess.run([sys.executable, "-m", "megatron_refine.cli", "train", "--config", "refine-mid-deltanet-1p3b",
                          "--dry-run", "--set", "parallel.tensor_model_parallel_size=8"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert "1,365,677,056 parameters" in last and "TP 8" in last and "524,288 tokens a step" in last
    assert "128 documents a rollout round of 4 steps" in last
    assert yaml.safe_load(run.stdout)["refine"]["mini_batches"] == 4


def _meta_counts(names):
    from megatron_refine.models import get_config
    from megatron_refine.models.summary import parameter_counts
    from megatron_refine.runtime import initialize

    initialize(device="cpu")
    return {name: parameter_counts(get_config(name), QWEN3_5_VOCAB) for name in names}


def test_qwen3_5_presets_build_with_the_estimators_parameter_count():
    from megatron_refine.models import get_config
    from megatron_refine.training.estimate import parameter_count

    names = [f"qwen3_5_{size}" for size in ("0p8b", "2b", "4b", "9b")]
    counts = spawn(_meta_counts, 1, names)[0]  # built on the meta device
    for name in names:
        assert counts[name] == parameter_count(get_config(name), QWEN3_5_VOCAB), name
        assert get_config(name).hybrid_layer_pattern == "GGG*" * (get_config(name).num_layers // 4)
    # Qwen3.5-2B's text model: the sum of the shapes in its safetensors headers (tied embeddings)
    assert counts["qwen3_5_2b"]["total"] == 1_881_825_088


def _tiny_preset_run(corpus, name):
    from megatron_refine.training import train

    cfg = load_config(name, [
        f"data.path={corpus}", "model.config=deltanet_tiny", "data.seq_length=96", "data.global_batch_size=2",
        "data.micro_batch_size=1", "train_steps=4", "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "device=cpu",
        "logging.log_interval=100"])
    result = train(cfg)
    return len(result.losses), [h["ppo_ratio_mean"] for h in result.refine_history]


def test_the_refine_preset_trains_with_a_tiny_model(corpus):
    steps, ratios = spawn(_tiny_preset_run, 1, corpus, "refine-mid-deltanet-1p3b")[0]
    assert steps == 4 and len(ratios) == 4  # one rollout round of 4 PPO steps
    assert ratios[0] == pytest.approx(1, abs=1e-3) and ratios[-1] != pytest.approx(1, abs=1e-6)


def _weight_decay_groups(corpus, decay_all):
    from megatron_refine.training import setup

    cfg = load_config("tiny-deltanet", [f"data.path={corpus}", "device=cpu", "data.seq_length=32",
                                        f"optimizer.decay_norms_and_biases={decay_all}"])
    trainer = setup(cfg)
    undecayed = 0
    for group in trainer.optimizer.param_groups:
        if group["weight_decay"] == 0:
            undecayed += sum(p.numel() for p in group["params"])
    norms = sum(p.numel() for name, p in trainer.module.named_parameters() if p.ndim == 1 or name.endswith(".bias"))
    return undecayed, norms


def test_weight_decay_on_norms_and_biases_is_an_option(corpus):
    undecayed, norms = spawn(_weight_decay_groups, 1, corpus, "false")[0]
    assert undecayed == norms > 0  # Megatron's rule: 1-D parameters and biases are not decayed
    assert spawn(_weight_decay_groups, 1, corpus, "true")[0][0] == 0  # the release's AdamW decays everything
