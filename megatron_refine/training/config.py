"""Training configuration: one dataclass per concern, loaded from a YAML file or a built-in name, with
`--set section.field=value` overrides (values parsed as YAML: 3e-4, true, [1, 2], ...)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_refine.refine.config import RefineConfig

STAGES = ("pretrain", "refine-mid", "refine-post", "ttt")
PROMPT_STAGES = ("refine-post", "ttt")  # data.layout prompt_answer: an update on the prompts (prompt_update)
PROMPT_UPDATES = ("refine", "ntp", "none")
DEVICES = (None, "cuda", "cpu")
AT_LEAST_ONE = ("train_steps", "max_skipped_steps", "data.seq_length", "data.micro_batch_size",
                "data.global_batch_size", "logging.log_interval", "parallel.tensor_model_parallel_size",
                "parallel.pipeline_model_parallel_size", "parallel.context_parallel_size")
LR_DECAY_STYLES = ("cosine", "linear", "constant")


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
    # packed: documents concatenated into rows (the two options above). documents: each row is the first
    # seq_length + 1 tokens of one document, as REFINE's mid-training data (a GRPO group is then one document's
    # rollouts); no row holds a document boundary, so the two options above do not apply.
    layout: str = "packed"
    # documents: skip (and count) documents with fewer tokens, EOS included; null: seq_length + 1, as the paper's
    # release (documents of >= 16,384 tokens truncated to 16,384). Below that needs pad_short_documents.
    min_document_tokens: int | None = None
    # documents: right-pad documents shorter than seq_length + 1 tokens (and >= min_document_tokens) with EOS,
    # with no loss on the padding.
    pad_short_documents: bool = False
    # prompt_answer (stages refine-post, ttt): data.path is a jsonl of {"prompt", "answer" | "answers"} lines,
    # tokenized with this tokenizer (byte or a tokenizer.json; null: the one of the checkpoint loaded).
    tokenizer: str | None = None
    max_answer_tokens: int = 32  # answers (EOS included) are cut to this; prompts to seq_length - this
    prompt_truncation: str = "left"  # a long prompt loses its start (left: the question at its end stays) or end

    def validate(self, stage: str) -> None:
        layouts = ("packed", "documents", "prompt_answer")
        if self.layout not in layouts:
            raise ValueError(f"data.layout must be one of {layouts}, got {self.layout!r}: packed concatenates "
                             "documents into rows, documents gives each row one document, prompt_answer reads "
                             "a jsonl of prompts and answers (stages refine-post, ttt)")
        if (self.layout == "prompt_answer") != (stage in PROMPT_STAGES):
            raise ValueError(f"stage {stage} with data.layout={self.layout}: stages {' and '.join(PROMPT_STAGES)} "
                             "train on data.layout=prompt_answer (a jsonl of prompts and answers), the others on "
                             "preprocessed shards (packed or documents)")
        if self.prompt_truncation not in ("left", "right"):
            raise ValueError(f"data.prompt_truncation must be left or right, got {self.prompt_truncation!r}")
        if self.layout == "prompt_answer" and not 1 <= self.max_answer_tokens < self.seq_length - 1:
            raise ValueError(f"data.max_answer_tokens ({self.max_answer_tokens}) must be >= 1 and leave a prompt "
                             f"in data.seq_length ({self.seq_length}): prompts are cut to seq_length - max_answer_tokens")
        if self.layout != "documents" and (self.min_document_tokens is not None or self.pad_short_documents):
            raise ValueError("data.min_document_tokens and data.pad_short_documents apply to data.layout=documents: "
                             "set data.layout=documents, or leave them unset")
        if self.min_document_tokens is None:
            return
        need = self.seq_length + 1
        if self.min_document_tokens < 2:
            raise ValueError(f"data.min_document_tokens must be >= 2 (an input token and its label), got "
                             f"{self.min_document_tokens}; leave it unset for data.seq_length + 1 = {need}")
        if self.min_document_tokens < need and not self.pad_short_documents:
            raise ValueError(f"data.min_document_tokens ({self.min_document_tokens}) is below data.seq_length + 1 "
                             f"({need}): a row is seq_length + 1 tokens, so set data.pad_short_documents=true to pad "
                             "shorter documents, or leave data.min_document_tokens unset to skip them")
        if self.min_document_tokens < need and stage == "refine-mid":
            # With no document boundary in the row, REFINE's selection cannot tell the padding from the document.
            raise ValueError(f"stage refine-mid with padded rows (data.min_document_tokens {self.min_document_tokens} "
                             f"< data.seq_length + 1 = {need}) would branch rollouts inside the padding: leave "
                             "data.min_document_tokens unset (no padding), or pad only for NTP (stage pretrain)")


@dataclass
class OptimizerArgs:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0  # the global gradient norm is clipped to this; 0: no clipping
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"  # cosine, linear, constant (Megatron's OptimizerParamScheduler)
    lr_decay_steps: int | None = None  # default: train_steps
    use_distributed_optimizer: bool | None = None  # default: on with CUDA, off on CPU
    # Weight decay on every parameter, norms and biases included, as the REFINE release's AdamW does; false keeps
    # Megatron's rule (no decay on 1-D parameters and biases).
    decay_norms_and_biases: bool = False
    # On a resume the config's schedule (lr, min_lr, warmup, decay steps and style, weight decay) applies from the
    # resumed step, as Megatron-LM's --override-opt_param-scheduler; true keeps the checkpoint's instead.
    use_checkpoint_opt_param_scheduler: bool = False

    def validate(self) -> None:
        # Megatron's scheduler asserts these deep in a rank (min_lr <= lr), or takes them silently: a negative
        # clip_grad turns clipping off, a negative warmup is no warmup.
        for key in ("lr", "min_lr", "weight_decay", "warmup_steps"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"optimizer.{key} must be >= 0, got {getattr(self, key)}")
        if not self.clip_grad >= 0:
            raise ValueError(f"optimizer.clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) is above optimizer.lr ({self.lr}): the schedule decays "
                             "from lr to min_lr; lower min_lr (or set both equal for a constant rate)")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optimizer.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"optimizer.lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.lr_decay_steps is not None and self.lr_decay_steps < 1:
            raise ValueError(f"optimizer.lr_decay_steps must be >= 1 (or null: train_steps), got {self.lr_decay_steps}")


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Each sequence split into contiguous pieces over this many ranks (megatron-core's CP group); the fast-weight
    # state is passed between them (README, Context parallelism). DeltaNet, Gated DeltaNet and hybrids' attention.
    context_parallel_size: int = 1


@dataclass
class CheckpointArgs:
    save: str | None = None  # folder for iter_NNNNNNN checkpoints and the `latest` marker
    save_interval: int | None = None  # steps between saves (a final save always happens when `save` is set)
    load: str | None = None  # resume from this folder's latest checkpoint (model, optimizer, scheduler, RNG, data)
    finetune: bool = False  # with load: take the model weights only, start at step 0
    keep_last: int = 3  # the N highest complete iterations up to the one just saved (>= 1, that one included)
    overwrite: bool = False  # start fresh in a `save` folder that holds checkpoints (and no `load`)
    # Load a checkpoint trained on data of another tokenizer (same vocabulary size): a deliberate change only.
    allow_tokenizer_change: bool = False


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
    max_skipped_steps: int = 10  # stop with an error after this many consecutive NaN/Inf steps (no NaN checkpoints)
    seed: int = 1234
    # "cuda" (one GPU per local rank, NCCL, bf16) or "cpu" (gloo, fp32); default CUDA when the host has it.
    device: str | None = None
    # bf16 parameters with Megatron's mixed-precision optimizer (fp32 main weights); default on with CUDA.
    bf16: bool | None = None
    # Bitwise-reproducible runs: deterministic torch kernels, cuBLAS workspace, megatron-core's
    # deterministic_mode, NCCL ring all-reduce (README, Training: what stays nondeterministic on CUDA).
    deterministic: bool = False
    # pretrain (NTP), refine-mid (NTP steps interleaved with REFINE steps), refine-post (per batch of prompts and
    # answers: the prompt update, then an SFT step on the answers), ttt (the prompt update only: test-time training)
    stage: str = "pretrain"
    # refine-post and ttt: the update on the prompt tokens. refine: refine.sft_coef x NTP + refine.ppo_coef x PG
    # (REFINE branched inside each prompt); ntp: NTP only (the nested-NTP baseline); none: no update (refine-post's
    # plain SFT baseline).
    prompt_update: str = "refine"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_refine(self) -> bool:
        """Whether this run takes REFINE steps (rollouts: the whole model on one pipeline stage)."""
        return self.stage == "refine-mid" or (self.stage in PROMPT_STAGES and self.prompt_update == "refine")

    def validate(self) -> None:
        """Checks that need no process group, so a bad value fails before any rank starts (`load_config`)."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.prompt_update not in PROMPT_UPDATES:
            raise ValueError(f"prompt_update must be one of {PROMPT_UPDATES}, got {self.prompt_update!r}")
        if self.stage == "ttt" and self.prompt_update == "none":
            raise ValueError("stage ttt with prompt_update=none trains nothing: use prompt_update=refine or ntp")
        if self.uses_refine and self.model.overrides.get("recompute_granularity"):
            raise ValueError(
                f"stage {self.stage} takes REFINE steps, which cannot use activation recomputation (model.overrides."
                "recompute_granularity): each layer leaves its branch states beside its output, and a recomputed layer "
                "would detach them, dropping the policy gradient through the prefix. Leave it unset and raise "
                "parallel.tensor_model_parallel_size (with sequence_parallel) to fit memory")
        cp = self.parallel.context_parallel_size
        if cp > 1 and self.stage in PROMPT_STAGES:
            raise ValueError(f"parallel.context_parallel_size={cp} with stage {self.stage}: prompt / answer stages run "
                             "short prompts and are not tested under context parallelism; use context_parallel_size=1 "
                             "(stages pretrain and refine-mid take it)")
        if cp > 1 and self.parallel.pipeline_model_parallel_size > 1:
            raise ValueError(f"parallel.context_parallel_size={cp} with pipeline_model_parallel_size="
                             f"{self.parallel.pipeline_model_parallel_size}: the two together are not tested here; use "
                             "tensor and data parallelism beside context parallelism")
        if self.stage == "refine-post" and self.refine.mini_batches > 1:
            raise ValueError(f"stage refine-post takes one on-policy prompt update a batch (refine.mini_batches=1, got "
                             f"{self.refine.mini_batches}); test-time training (stage ttt) takes mini-batches")
        if self.device not in DEVICES:
            raise ValueError(f"device must be cuda or cpu (or null: CUDA when the host has it), got {self.device!r}")
        if self.checkpoint.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1: the checkpoint just written is always kept "
                             f"(got {self.checkpoint.keep_last})")
        for key in AT_LEAST_ONE:
            value = functools.reduce(getattr, key.split("."), self)
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self.data.validate(self.stage)
        self.optimizer.validate()
        self.refine.validate()
        rounds = self.refine.mini_batches
        if self.uses_refine and rounds > 1:  # a checkpoint between a round's steps would lose its rollouts
            for key, value in (("train_steps", self.train_steps), ("checkpoint.save_interval", self.checkpoint.save_interval),
                               ("exit_interval", self.exit_interval)):
                if value and value % rounds:
                    raise ValueError(f"{key} ({value}) must be a multiple of refine.mini_batches ({rounds}): "
                                     "checkpoints fall between rollout rounds, never inside one")


# The paper's mid-training (../shared/specs/refine-algorithm.md, docs/reproducing.md): the release's AdamW (lr 1e-6
# constant, no warmup, weight decay 0.01 on every parameter, betas (0.9, 0.999), clip 1.0), bf16, one document of
# 16384 tokens per row (longer ones truncated, shorter ones skipped), 128 documents per rollout round in 4 optimizer
# steps of 32, a REFINE step every step. The NTP baselines see the same documents in the same steps.
_PAPER_MID = {
    "optimizer": {"lr": 1e-6, "min_lr": 1e-6, "warmup_steps": 0, "lr_decay_style": "constant", "weight_decay": 0.01,
                  "adam_beta1": 0.9, "adam_beta2": 0.999, "clip_grad": 1.0, "decay_norms_and_biases": True},
    "data": {"layout": "documents", "seq_length": 16384, "micro_batch_size": 1, "global_batch_size": 32},
    "bf16": True,
    "train_steps": 100,
}
_REFINE_MID = {"stage": "refine-mid", "refine": {"every": 1, "mini_batches": 4, "reward": "cosine",
                                                 "sft_coef": 1.0, "ppo_coef": 0.2}}

# The paper's post-training ("nested", per batch of 16 prompts: a REFINE update on the prompts, NTP x 1.0 + PG x 0.2
# with the hybrid reward, then an SFT step on the answers) and its baselines: plain SFT, nested NTP. RULER QA at
# 4K / 8K / 16K: rows of 16384 tokens hold every prompt (cut to 16352) and its answer (<= 32 tokens).
_PAPER_POST = {
    "optimizer": _PAPER_MID["optimizer"], "bf16": True, "train_steps": 100, "stage": "refine-post",
    "data": {"layout": "prompt_answer", "seq_length": 16384, "micro_batch_size": 1, "global_batch_size": 16},
    "refine": {"every": 1, "mini_batches": 1, "reward": "hybrid", "sft_coef": 1.0, "ppo_coef": 0.2},
}
# Test-time training (`megatron-refine eval --ttt`): per batch of 8 test prompts one rollout round, NTP x 1.0 +
# PG x 0.4 with the binary reward, in 2 optimizer steps of 4 prompts; the model comes from the checkpoint (bf16
# on CUDA, fp32 on a CPU, as `bf16` defaults).
_PAPER_TTT = {
    "optimizer": _PAPER_MID["optimizer"], "train_steps": 2, "stage": "ttt",
    "data": {"layout": "prompt_answer", "seq_length": 16384, "micro_batch_size": 1, "global_batch_size": 4},
    "refine": {"every": 1, "mini_batches": 2, "reward": "binary", "sft_coef": 1.0, "ppo_coef": 0.4},
}

# Built-in configs by name: overrides of the defaults above.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny-deltanet": {"model": {"config": "deltanet_tiny"}},
    "tiny-lact": {"model": {"config": "lact_tiny"}},
    "tiny-gated-deltanet": {"model": {"config": "gated_deltanet_tiny"}},
    "refine-mid-deltanet-1p3b": {"model": {"config": "deltanet_1p3b"}, **_PAPER_MID, **_REFINE_MID},
    "refine-mid-lact-760m": {"model": {"config": "lact_760m"}, **_PAPER_MID, **_REFINE_MID},
    "ntp-mid-deltanet-1p3b": {"model": {"config": "deltanet_1p3b"}, **_PAPER_MID},
    "ntp-mid-lact-760m": {"model": {"config": "lact_760m"}, **_PAPER_MID},
    # Gated DeltaNet at fla's 1.3B layout, under the paper's DeltaNet protocol (the paper has no GDN run)
    "refine-mid-gated-deltanet-1p3b": {"model": {"config": "gated_deltanet_1p3b"}, **_PAPER_MID, **_REFINE_MID},
    "ntp-mid-gated-deltanet-1p3b": {"model": {"config": "gated_deltanet_1p3b"}, **_PAPER_MID},
    # Long context (issue 31): the same protocol on 65,536-token documents, 8 a step (the paper's 524,288 tokens a
    # step, 32 documents a rollout round), each split over context-parallel ranks (recipes/, docs/scaling.md)
    **{f"{name}-mid-gated-deltanet-1p3b-64k": {"model": {"config": "gated_deltanet_1p3b"}, **_PAPER_MID, **stage,
                                               "data": {**_PAPER_MID["data"], "seq_length": 65536,
                                                        "global_batch_size": 8}}
       for name, stage in (("refine", _REFINE_MID), ("ntp", {}))},
    # Hybrids: a tiny one for a CPU, and the paper's mid-training protocol on Qwen3.5's text models (from their
    # converted checkpoints: convert-from-hf)
    "tiny-hybrid": {"model": {"config": "hybrid_tiny"}},
    **{f"{name}-mid-{model.replace('_', '-')}": {"model": {"config": model}, **_PAPER_MID, **stage}
       for name, stage in (("refine", _REFINE_MID), ("ntp", {}))
       for model in ("qwen3_5_0p8b", "qwen3_5_2b", "qwen3_5_4b", "qwen3_5_9b")},
    **{f"{name}-post-{model.replace('_', '-')}": {"model": {"config": model}, **_PAPER_POST, "prompt_update": update}
       for name, update in (("refine", "refine"), ("ntp", "ntp"), ("sft", "none"))
       for model in ("deltanet_1p3b", "lact_760m", "gated_deltanet_1p3b")},
    "ttt-refine": {**_PAPER_TTT, "prompt_update": "refine"},
    "ttt-ntp": {**_PAPER_TTT, "prompt_update": "ntp"},
}


BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_EXPECTS = {bool: "true or false (or yes/no, 1/0)", int: "an integer", float: "a float", str: "a string",
            dict: "a mapping"}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A YAML value checked against its field's annotation (bool, int, float, str, dict, or `X | None`).

    Strict where a typo would otherwise pass (`flase`, 5.5 for an int); lenient where YAML 1.1 is odd: it
    reads 3e-4 and 1e3 (no dot) as strings, so numbers are parsed from strings, and 1e3 fits an int."""
    kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    if value is None and type(None) in typing.get_args(hint):
        return None  # `X | None`: null means "not set", the default
    error = ValueError(f"{key} expects {_EXPECTS.get(kind, kind.__name__)}, "
                       f"got {'null' if value is None else repr(value)}")
    if kind is bool:
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if not isinstance(value, bool) and word not in BOOLEANS:
            raise error
        return value if isinstance(value, bool) else BOOLEANS[word]
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise error
        try:
            number = float(value)
        except ValueError:
            raise error from None
        if kind is float:
            return number
        if not number.is_integer():
            raise error
        return value if isinstance(value, int) else int(number)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a path or a name that YAML read as a number: data.path=2024
    if kind in (str, dict) and not isinstance(value, kind):
        raise error
    return value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)  # the annotations are strings (`from __future__ import annotations`)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config keys {[f'{where}{k}' for k in unknown]}; valid: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{name} is a section: give it as a mapping")
            kwargs[name] = _build(hints[name], value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(f"{where}{name}", value, hints[name])
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


def _parse_yaml(text: str, where: str, file: bool = True) -> Any:
    """YAML, or a ValueError that names where the text came from and, in a file, the line (PyYAML's names neither)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1} column {mark.column + 1}:" if mark and file else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}:{line} not valid YAML ({problem}): fix the syntax there") from None


def load_config(source: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A config from a YAML path or a built-in name (or the defaults), then `key.path=value` overrides."""
    values: dict = {}
    if source:
        if source in NAMED_CONFIGS:
            values = NAMED_CONFIGS[source]
        elif Path(source).is_file():
            values = _parse_yaml(Path(source).read_text(), source) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{source} holds a {type(values).__name__}, not a config: write sections as a "
                                 "mapping (model:, data:, optimizer:, ...)")
        else:
            raise ValueError(f"config {source!r} is neither a YAML file nor one of {sorted(NAMED_CONFIGS)}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        update: dict = {}
        _set(update, key.strip(), _parse_yaml(raw, f"--set {item}", file=False))
        values = _merge(values, update)
    cfg = _build(TrainConfig, values, "")
    cfg.validate()
    return cfg
