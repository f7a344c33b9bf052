"""NeMo-Run recipes: every recipe resolves to a valid config and dry-runs on both executors (the bare-metal sbatch
script has no container flag and sets the rendezvous); the CPU recipe trains through NeMo-Run's local executor with
torchrun on 2 gloo processes; the estimator counts every preset's parameters as build_model does (hybrids
included)."""

import os
import subprocess
import sys

import pytest

from megatron_refine.training.estimate import FIT_GIB, H100_MEMORY_GIB, parameter_count
from recipes import RECIPES, get_recipe
from recipes.__main__ import main


@pytest.fixture(autouse=True)
def nemo_run_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run"))  # experiments of the dry runs, not ~/.nemo_run
    with open(os.devnull) as devnull:  # NeMo-Run's LocalTunnel runs its shell commands through invoke, which
        monkeypatch.setattr(sys, "stdin", devnull)  # forwards stdin: pytest's captured stdin refuses reads
        yield


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_resolves_and_dry_runs_on_both_executors(name, capsys):
    recipe = get_recipe(name)
    cfg = recipe.resolve()
    assert cfg.model.config == recipe.model and cfg.parallel.tensor_model_parallel_size == recipe.tensor_model_parallel_size
    gpus = recipe.nodes * recipe.gpus_per_node
    # local: this machine's GPUs, one node (a multi-node recipe there with DP scaled down)
    assert main([name, "--executor", "local", "--nodes", "1", "--dryrun"]) == 0
    command = capsys.readouterr().out
    assert f"--nproc-per-node {recipe.gpus_per_node}" in command and "-m megatron_refine.cli train" in command
    assert f"--config {recipe.config}" in command and f"model.config={recipe.model}" in command
    assert main([name, "--executor", "slurm", "--account", "acct", "--partition", "batch", "--venv", "/shared/venv",
                 "--dryrun"]) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH --nodes={recipe.nodes}" in script and "#SBATCH --account=acct" in script
    assert "--container" not in script and "source /shared/venv/bin/activate" in script  # bare metal
    assert "head_node_ip=" in script and f"--nnodes {recipe.nodes}" in script
    assert f"--nproc-per-node {recipe.gpus_per_node}" in script and "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    if recipe.nodes > 1:  # the rendezvous on the first node; one node rendezvous on localhost
        assert "--rdzv-endpoint $head_node_ip:29500" in script and "--node-rank $SLURM_NODEID" in script
    assert "data.path=/" in script  # relative paths made absolute: srun runs in NeMo-Run's job folder
    if name.startswith("midtrain"):
        from recipes.estimate import recipe_row

        row = recipe_row(name, None, 0.4)  # the recipe's checkpoint's vocabulary (Qwen3.5's 248,320)
        # under the 60 GiB bound, or (LaCT-3B: TP capped by its 4 fast-weight heads) with 8 GiB of an H100 to spare
        assert row["gpus"] == gpus and row["total"] <= (FIT_GIB if name != "midtrain_lact_3b" else H100_MEMORY_GIB - 8)


def test_a_container_run_mounts_and_skips_the_venv(capsys):
    assert main(["midtrain_deltanet_1p3b", "--executor", "slurm", "--account", "a", "--partition", "p",
                 "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--container-mounts", "/lustre:/lustre",
                 "--dryrun"]) == 0
    script = capsys.readouterr().out
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in script and "/lustre:/lustre" in script
    assert "activate" not in script


def test_bad_layouts_and_missing_flags_name_the_fix(capsys):
    assert main(["midtrain_deltanet_1p3b", "--dryrun", "--set", "parallel.tensor_model_parallel_size=3"]) == 2
    assert "must be divisible by tensor_model_parallel_size" in capsys.readouterr().err
    assert main(["midtrain_deltanet_1p3b", "--nodes", "3", "--executor", "slurm", "--account", "a", "--partition", "p",
                 "--venv", "/v", "--dryrun"]) == 2  # 24 DP ranks do not divide 32 documents a step
    assert "data.global_batch_size 32 is not a multiple" in capsys.readouterr().err
    assert main(["midtrain_deltanet_2p7b", "--executor", "local", "--dryrun"]) == 2
    assert "use --executor slurm" in capsys.readouterr().err
    assert main(["midtrain_deltanet_1p3b", "--executor", "slurm", "--dryrun"]) == 2
    assert "--account and --partition" in capsys.readouterr().err
    assert main(["nope"]) == 2 and "python -m recipes --list" in capsys.readouterr().err


@pytest.mark.parametrize("nodes", ["0", "-2"])  # 0 became the recipe's nodes; -2 reached torchx's format error
def test_nodes_below_one_fail_at_parse_time(nodes, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["midtrain_deltanet_1p3b", "--nodes", nodes, "--dryrun"])
    assert exit.value.code == 2 and f"argument --nodes: must be >= 1, got {nodes}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--config", "tiny-deltanet", "--mfu", "-1"], "argument --mfu: must be in (0, 1], got -1"),  # a negative step time
    (["--config", "tiny-deltanet", "--gpus", "0"], "argument --gpus: must be >= 1, got 0"),  # ZeroDivisionError
    (["--config", "tiny-deltanet", "--set", "parallel.tensor_model_parallel_size=0"],
     "parallel.tensor_model_parallel_size must be >= 1, got 0"),  # ZeroDivisionError
    (["--config", "tiny-deltanet", "--gpus", "3", "--set", "parallel.tensor_model_parallel_size=2"],
     "--gpus 3 is not a multiple of TP x PP x CP = 2 x 1 x 1"),
    (["--config", "ntp-mid-lact-760m", "--context-parallel-size", "2"], "lact has no context parallelism"),
])
def test_the_estimator_refuses_nonsense_in_one_line(argv, message, capsys):
    from recipes.estimate import main as estimate

    try:
        code = estimate(argv)
    except SystemExit as exit:  # argparse's own exit
        code = exit.code
    assert code == 2 and message in capsys.readouterr().err


def test_the_estimator_counts_parameters_as_build_model_does():
    from megatron_refine.models import PRESETS, get_config
    from megatron_refine.runtime import spawn

    counts = spawn(_meta_counts, 1)[0]
    for name in PRESETS:
        assert parameter_count(get_config(name), 32000) == counts[name], name


def _meta_counts():
    from megatron_refine.models import PRESETS, get_config
    from megatron_refine.models.summary import parameter_counts
    from megatron_refine.runtime import initialize

    initialize(device="cpu")
    return {name: parameter_counts(get_config(name), 32000) for name in PRESETS}


def test_the_cpu_recipe_trains_through_nemo_run_with_torchrun(tmp_path):
    from megatron_refine.data import write_builtin_corpus

    write_builtin_corpus(tmp_path / "data", 100, seed=0, shard_size=25, progress=False)
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemo_run")}
    run = subprocess.run([sys.executable, "-m", "recipes", "pretrain_tiny_cpu", "--executor", "local",
                          "--set", "data.path=data", "--set", "checkpoint.save=ckpt"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "4"


def _saved_bytes_per_token(module, x, **kwargs):
    import torch

    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        module(x, **kwargs)
    return sum(storages.values()) / x.shape[0]


def _measured_activations():
    """Saved-tensor bytes per token of a DeltaNet mixer (the PyTorch chunked path) and a SwiGLU MLP, fp32 on a CPU."""
    import torch

    from megatron_refine.models import build_model, get_config
    from megatron_refine.runtime import initialize

    initialize(device="cpu")
    config = get_config("deltanet_1p3b", hidden_size=512, num_attention_heads=4, num_layers=1, ffn_hidden_size=1536,
                        use_cpu_initialization=True)
    layer = build_model(config, 256).decoder.layers[0]
    x = torch.randn(1024, 1, 512, requires_grad=True)
    return (config, _saved_bytes_per_token(layer.self_attention, x, attention_mask=None),
            _saved_bytes_per_token(layer.mlp, x))


def test_the_activation_coefficients_match_what_the_layers_keep():
    """The estimator's measured constants, measured again: the MLP's 2h + 6 ffn values and DeltaNet's PyTorch
    chunked path (REFINE's branch forward) at about 88 h bytes plus its chunk-start states, fp32 here."""
    from megatron_refine.runtime import spawn
    from megatron_refine.training.estimate import deltanet_reference_bytes

    config, mixer, mlp = spawn(_measured_activations, 1)[0]
    h, ffn = config.hidden_size, config.ffn_hidden_size
    assert abs(mlp - 4 * (2 * h + 6 * ffn)) / mlp < 0.1, mlp
    assert abs(mixer - deltanet_reference_bytes(config)) / mixer < 0.15, (mixer, deltanet_reference_bytes(config))


def test_the_long_context_recipe_is_the_estimators_layout(capsys):
    from megatron_refine.models import get_config
    from megatron_refine.training.estimate import Layout, estimate, longest_document
    from recipes.estimate import main as estimate_main

    recipe = get_recipe("midtrain_gated_deltanet_1p3b_64k")
    cfg = recipe.resolve()
    assert (cfg.data.seq_length, cfg.parallel.context_parallel_size, cfg.uses_refine) == (65536, 8, True)
    model = get_config(cfg.model.config)
    # the smallest TP x CP (then TP) fitting 64K: what longest_document picks when 64K is the longest it searches
    _, layout, e = longest_document(model, 32000, 8, refine=True, lengths=(65536,))
    assert (layout.tensor_model_parallel_size, layout.context_parallel_size) == (
        cfg.parallel.tensor_model_parallel_size, cfg.parallel.context_parallel_size)
    assert e["total"] <= FIT_GIB
    # half the CP does not fit, at any TP the 6 heads allow
    assert all(estimate(model, 32000, Layout(gpus=8, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                                             micro_batch_size=1, seq_length=65536, refine=True,
                                             context_parallel_size=4 // tp))["total"] > FIT_GIB for tp in (1, 2))
    # the 8 GPUs do not divide into TP x CP 16
    assert main(["midtrain_gated_deltanet_1p3b_64k", "--dryrun", "--set",
                 "parallel.tensor_model_parallel_size=2"]) == 2
    assert "8 GPUs do not divide into TP x PP x CP = 16" in capsys.readouterr().err
    assert estimate_main(["--config", "refine-mid-gated-deltanet-1p3b-64k", "--context-parallel-size", "8"]) == 0
    assert "| TP 1, PP 1, CP 8, DP 1 |" in capsys.readouterr().out
