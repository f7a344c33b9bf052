"""Training configuration: one dataclass per concern, loaded from a YAML file or a built-in name, with
`--set section.field=value` overrides (values parsed as YAML: 3e-4, true, [1, 2], ...)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_refine.refine.config import RefineConfig

STAGES = ("pretrain", "refine-mid")


@dataclass
class ModelArgs:
    config: str = "deltanet_tiny"  # a preset of megatron_refine.models.PRESETS
    overrides: dict = field(default_factory=dict)  # FastWeightConfig fields, e.g. {num_layers: 4}


@dataclass
class DataArgs:
    path: str = ""  # a folder written by `megatron-refine preprocess`
    seq_length: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 8  # micro_batch_size x data-parallel size x micro-batches per step
    seed: int = 0
    # Documents are packed into rows; restart the fast-weight state (and conv, window, RoPE) at each one, as
    # if it ran alone (Megatron-LM's --reset-attention-mask / --reset-position-ids for attention models).
    # false: memory carries over from one document into the next, as in plain concatenation.
    reset_at_document_boundaries: bool = True
    # No loss where the input is a document's EOS (its label is the next document's first token, which a
    # model reset at the boundary cannot know): Megatron-LM's --eod-mask-loss. Off by default, as there.
    eod_mask_loss: bool = False


@dataclass
class OptimizerArgs:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"  # cosine, linear, constant (Megatron's OptimizerParamScheduler)
    lr_decay_steps: int | None = None  # default: train_steps
    use_distributed_optimizer: bool | None = None  # default: on with CUDA, off on CPU


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class CheckpointArgs:
    save: str | None = None  # folder for iter_NNNNNNN checkpoints and the `latest` marker
    save_interval: int | None = None  # steps between saves (a final save always happens when `save` is set)
    load: str | None = None  # resume from this folder's latest checkpoint (model, optimizer, scheduler, RNG, data)
    finetune: bool = False  # with load: take the model weights only, start at step 0
    keep_last: int = 3


@dataclass
class LoggingArgs:
    log_interval: int = 10
    tensorboard_dir: str | None = None
    wandb_project: str | None = None


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    refine: RefineConfig = field(default_factory=RefineConfig)
    train_steps: int = 100
    exit_interval: int | None = None  # stop (after saving, when checkpoint.save is set) at a multiple of this step
    seed: int = 1234
    # "cuda" (one GPU per local rank, NCCL, bf16) or "cpu" (gloo, fp32); default CUDA when the host has it.
    device: str | None = None
    # bf16 parameters with Megatron's mixed-precision optimizer (fp32 main weights); default on with CUDA.
    bf16: bool | None = None
    # Bitwise-reproducible runs: deterministic torch kernels, cuBLAS workspace, megatron-core's
    # deterministic_mode, NCCL ring all-reduce (README, Training: what stays nondeterministic on CUDA).
    deterministic: bool = False
    stage: str = "pretrain"  # pretrain (NTP), refine-mid (NTP steps interleaved with REFINE steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Built-in configs by name: overrides of the defaults above.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny-deltanet": {"model": {"config": "deltanet_tiny"}},
    "tiny-lact": {"model": {"config": "lact_tiny"}},
}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """YAML 1.1 reads 3e-4 (no dot) as a string: convert to the field's type where the default shows it."""
    if isinstance(default, bool) or default is None or not isinstance(value, (str, int)) or isinstance(value, bool):
        return value
    try:
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int) and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ValueError(f"{key} expects a {type(default).__name__}, got {value!r}") from None
    return value


def _build(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}{k}' for k in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} is a section: give it as a mapping")
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(f"{where}{name}", value, default)
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(source: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A config from a YAML path or a built-in name (or the defaults), then `key.path=value` overrides."""
    values: dict = {}
    if source:
        if source in NAMED_CONFIGS:
            values = NAMED_CONFIGS[source]
        elif Path(source).is_file():
            values = yaml.safe_load(Path(source).read_text()) or {}
        else:
            raise ValueError(f"config {source!r} is neither a YAML file nor one of {sorted(NAMED_CONFIGS)}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        update: dict = {}
        _set(update, key.strip(), yaml.safe_load(raw))
        values = _merge(values, update)
    cfg = _build(TrainConfig, values, "")
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {cfg.stage!r}")
    return cfg
