"""Config parsing: values checked against the dataclass annotations, ranges checked at load time."""

import pytest

from megatron_refine.training import load_config


@pytest.mark.parametrize("item, field, expected", [
    ("checkpoint.finetune=yes", ("checkpoint", "finetune"), True),
    ("checkpoint.finetune=No", ("checkpoint", "finetune"), False),
    ("checkpoint.finetune='TRUE'", ("checkpoint", "finetune"), True),  # a quoted string
    ("checkpoint.finetune='0'", ("checkpoint", "finetune"), False),
    ("checkpoint.finetune=1", ("checkpoint", "finetune"), True),
    ("data.seq_length='64'", ("data", "seq_length"), 64),
    ("train_steps=1e3", ("train_steps",), 1000),  # YAML 1.1 reads 1e3 as a string
    ("optimizer.lr=1", ("optimizer", "lr"), 1.0),  # floats accept ints
    ("optimizer.min_lr=1e-5", ("optimizer", "min_lr"), 1e-5),
    ("optimizer.lr_decay_steps=50", ("optimizer", "lr_decay_steps"), 50),  # `int | None` takes an int
    ("optimizer.lr_decay_steps=null", ("optimizer", "lr_decay_steps"), None),
    ("optimizer.use_distributed_optimizer=false", ("optimizer", "use_distributed_optimizer"), False),
    ("checkpoint.save=2024", ("checkpoint", "save"), "2024"),  # a folder name YAML reads as a number
    ("optimizer.lr_decay_style=linear", ("optimizer", "lr_decay_style"), "linear"),
    ("device=null", ("device",), None),
    ("model.overrides={num_layers: 2}", ("model", "overrides"), {"num_layers": 2}),
])
def test_values_are_parsed_by_their_fields_type(item, field, expected):
    value = load_config(None, [item])
    for name in field:
        value = getattr(value, name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("item, message", [
    ("checkpoint.finetune=flase", r"checkpoint.finetune expects true or false \(or yes/no, 1/0\), got 'flase'"),
    ("checkpoint.finetune=2", "checkpoint.finetune expects true or false"),
    ("data.seq_length=5.5", "data.seq_length expects an integer, got 5.5"),
    ("data.seq_length='5.5'", "data.seq_length expects an integer, got '5.5'"),
    ("data.seq_length=true", "data.seq_length expects an integer, got True"),
    ("train_steps=", "train_steps expects an integer, got null"),
    ("optimizer.lr=fast", "optimizer.lr expects a float, got 'fast'"),
    ("optimizer.lr_decay_steps=5.5", "optimizer.lr_decay_steps expects an integer, got 5.5"),
    ("optimizer.lr_decay_style=[1]", r"optimizer.lr_decay_style expects a string, got \[1\]"),
    ("model.overrides=4", "model.overrides expects a mapping, got 4"),
    ("model=4", "model is a section: give it as a mapping"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_what_it_takes(item, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [item])


@pytest.mark.parametrize("items, message", [
    (["refine.every=0"], "refine.every must be >= 1, got 0"),
    (["refine.k=0"], "refine.k must be >= 1, got 0"),
    (["refine.n=0"], "refine.n must be >= 1, got 0"),
    (["refine.margin=4", "refine.k=5"], r"refine.margin \(4\) must be >= refine.k \(5\).*raise refine.margin or lower refine.k"),
    (["refine.selection=max"], r"refine.selection must be one of \('entropy', 'uniform', 'argmax', 'argmin'\), got 'max'"),
    (["refine.reward=l2"], r"refine.reward must be one of \('cosine', 'binary', 'hybrid'\), got 'l2'"),
    (["train_steps=0"], "train_steps must be >= 1, got 0"),
    (["max_skipped_steps=0"], "max_skipped_steps must be >= 1, got 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1: the checkpoint just written is always kept"),
    (["logging.log_interval=0"], "logging.log_interval must be >= 1, got 0"),
    (["device=tpu"], "device must be cuda or cpu .* got 'tpu'"),
    (["stage=post"], r"stage must be one of \('pretrain', 'refine-mid', 'refine-post', 'ttt'\), got 'post'"),
    # Megatron's scheduler would assert deep in a rank, or take the value silently (-1 turned clipping off).
    (["optimizer.min_lr=1e-3", "optimizer.lr=1e-4"], r"optimizer.min_lr \(0.001\) is above optimizer.lr \(0.0001\)"),
    (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps must be >= 0, got -1"),
    (["optimizer.clip_grad=-1"], r"optimizer.clip_grad must be >= 0 \(0: no clipping\), got -1.0"),
    (["optimizer.adam_beta2=1"], r"optimizer.adam_beta2 must be in \[0, 1\), got 1.0"),
    (["optimizer.lr_decay_style=cosin"], r"optimizer.lr_decay_style must be one of \('cosine', 'linear', 'constant'\)"),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size must be >= 1, got 0"),
    (["parallel.pipeline_model_parallel_size=-2"], "parallel.pipeline_model_parallel_size must be >= 1, got -2"),
])
def test_out_of_range_values_fail_at_load_time(items, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, items)


def test_a_yaml_file_is_checked_like_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint:\n  finetune: no\n  overwrite: yes\nrefine:\n  margin: 8\n  k: 8\n")
    cfg = load_config(str(path))
    assert (cfg.checkpoint.finetune, cfg.checkpoint.overwrite, cfg.refine.margin) == (False, True, 8)
    path.write_text("train_steps: 2.5\n")
    with pytest.raises(ValueError, match="train_steps expects an integer, got 2.5"):
        load_config(str(path))


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  config: deltanet_tiny\n optimizer: {lr: 1}\n")  # one space short on line 3
    with pytest.raises(ValueError, match=rf"^{path}: line 3 column 2: not valid YAML \(expected <block end>"):
        load_config(str(path))
    path.write_text("- model\n")
    with pytest.raises(ValueError, match=rf"^{path} holds a list, not a config"):
        load_config(str(path))
    with pytest.raises(ValueError, match=r"^--set optimizer.lr=\[1,: not valid YAML"):
        load_config(None, ["optimizer.lr=[1,"])


def test_the_defaults_and_the_named_configs_are_valid():
    for name in (None, "tiny-deltanet", "tiny-lact"):
        load_config(name)


def test_refine_refuses_activation_recomputation():
    """A recomputed layer would detach the branch states it leaves beside its output: REFINE's policy gradient
    through the prefix would vanish silently (measured: the gradient norm of a REFINE step changed under it)."""
    from megatron_refine.training import load_config

    recompute = "model.overrides.recompute_granularity=full"
    assert load_config("tiny-deltanet", [recompute]).model.overrides["recompute_granularity"] == "full"  # NTP: fine
    for stage in (["stage=refine-mid"], ["stage=ttt", "data.layout=prompt_answer"]):
        with pytest.raises(ValueError, match="cannot use activation recomputation"):
            load_config("tiny-deltanet", [*stage, recompute])
