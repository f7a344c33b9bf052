"""NTP pretraining with megatron-core: read top to bottom.

setup: process groups -> data -> model (GPTModel over the fast-weight stack) -> DDP -> optimizer ->
scheduler -> loader (chosen once by data.layout; its `Batch`es say what to train on, data/batch.py) -> optional
checkpoint load. Each step: `num_microbatches` packed micro-batches through
Megatron's forward-backward schedule (pipeline schedules when PP > 1), a DP-averaged loss, a skipped step
when it is NaN/Inf, else the optimizer and scheduler step. bf16 and the distributed optimizer on GPU, fp32
and Megatron's plain optimizer on CPU by default (`bf16`, `optimizer.use_distributed_optimizer` override).
REFINE steps (`stage=refine-mid`) are on-policy (`refine_loss`), or with `refine.mini_batches` m > 1 the first
step of each rollout round rolls out the next m steps' batches (`collect_rollout_round`) and every step of the
round is a PPO update on its share (`ppo_update_loss`).
Prompt / answer batches (`data.layout=prompt_answer`): stage ttt takes the update on the prompt tokens
(`prompt_update`: REFINE branched inside each prompt, or NTP), and stage refine-post takes it and then an SFT step
on the answers: two optimizer steps a batch, the scheduler stepping once. Their NTP / SFT losses are token means
over the whole step (every micro-batch and DP rank), so prompts of any lengths weigh alike however they are split.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_refine.data import Batch, DocumentLoader, PackedLoader, ShardedDataset
from megatron_refine.data.prompt_answer import PromptAnswerDataset, PromptAnswerLoader
from megatron_refine.models import FastWeightGPTModel, build_model, frozen_copy, get_config, packed_seq_params
from megatron_refine.models.losses import context_parallel_sum, mean_loss
from megatron_refine.refine import (
    STEP_PHASES, StoredRollouts, check_logprob_parity, min_sequence_length, ppo_update_loss, refine_loss, rollout_round)
from megatron_refine.runtime import Runtime, initialize, set_deterministic
from megatron_refine.runtime.signals import DistributedSignalHandler
from megatron_refine.training.checkpointing import (
    latest_iteration, load_checkpoint, lock_save_folder, save_checkpoint, unlock_save_folder)
from megatron_refine.training.config import CheckpointArgs, TrainConfig
from megatron_refine.training.logger import MetricsLogger


class TrainingDivergedError(RuntimeError):
    """`max_skipped_steps` NaN/Inf steps in a row: the run stops instead of saving diverged weights."""


@dataclass
class StepResult:
    loss: float  # the NTP loss (on REFINE steps too; refine-post: the SFT loss on the answers)
    grad_norm: float | None
    skipped: bool
    refine: dict[str, float] = field(default_factory=dict)  # REFINE metrics, on REFINE steps
    prompt_loss: float | None = None  # refine-post: the NTP loss of the update on the prompts
    prompt_grad_norm: float | None = None


@dataclass
class TrainResult:
    model: FastWeightGPTModel  # the unwrapped module
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    skipped_steps: int = 0
    checkpoint: str | None = None
    refine_history: list[dict] = field(default_factory=list)  # metrics of each REFINE step
    step_tokens_per_s: list[float] = field(default_factory=list)
    stopped_by: str | None = None  # the signal (SIGTERM) that ended the run early, after saving


@dataclass
class Trainer:
    cfg: TrainConfig
    runtime: Runtime
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    loader: PackedLoader | DocumentLoader | PromptAnswerLoader
    num_microbatches: int
    start_step: int = 0
    reference: FastWeightGPTModel | None = None  # frozen starting model, for REFINE's KL term

    @property
    def module(self) -> FastWeightGPTModel:
        return self.model.module


def prompt_tokenizer(cfg: TrainConfig):
    """The tokenizer of prompt / answer text: data.tokenizer, else the one the loaded checkpoint was trained with."""
    from megatron_refine.training.checkpointing import tokenizer_or_saved

    found = tokenizer_or_saved(cfg.data.tokenizer, cfg.checkpoint.load)
    if found is None:
        raise ValueError("data.layout=prompt_answer tokenizes text: set data.tokenizer (byte, or a tokenizer.json), "
                         "or load a checkpoint that records its tokenizer")
    return found


def setup(cfg: TrainConfig, runtime: Runtime | None = None, dataset: PromptAnswerDataset | None = None) -> Trainer:
    """dataset: prompt / answer examples given in memory instead of data.path (test-time training's batches)."""
    par, data, opt = cfg.parallel, cfg.data, cfg.optimizer
    if cfg.deterministic:
        set_deterministic()
    rt = runtime or initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                               par.context_parallel_size, seed=cfg.seed, device=cfg.device)
    if cfg.checkpoint.save:  # before anything reads it: a second run into the folder, or a read-only one, stops here
        lock_save_folder(cfg.checkpoint.save)
    start = checkpoint_start(cfg.checkpoint, rt.is_main)
    if data.layout == "prompt_answer":
        dataset = dataset or PromptAnswerDataset.open(data.path, prompt_tokenizer(cfg), data.seq_length,
                                                      data.max_answer_tokens, data.prompt_truncation,
                                                      require_answers=cfg.stage == "refine-post")
    else:
        dataset = ShardedDataset.open(data.path)
    dp = rt.layout.data_parallel_size
    if data.global_batch_size % (data.micro_batch_size * dp) != 0:
        raise ValueError(
            f"global_batch_size {data.global_batch_size} must be a multiple of micro_batch_size x data-parallel size "
            f"= {data.micro_batch_size} x {dp}"
        )
    # Built before the model, so data that cannot fill a row fails at once. The one place that reads the layout's
    # flags: the loader's batches say what to train on (data/batch.py).
    sharding = dict(dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp, seed=data.seed)
    if data.layout == "documents":
        loader = DocumentLoader(dataset, data.seq_length, data.micro_batch_size,
                                min_document_tokens=data.min_document_tokens,
                                pad_short_documents=data.pad_short_documents, eod_mask_loss=data.eod_mask_loss,
                                **sharding)
        if rt.is_main:
            print(loader.summary(), flush=True)
    elif data.layout == "prompt_answer":  # test-time training reads the test stream in its order
        loader = PromptAnswerLoader(dataset, data.seq_length, data.micro_batch_size, shuffle=cfg.stage != "ttt",
                                    **sharding)
        if rt.is_main:
            print(dataset.summary(cfg.refine.margin if cfg.uses_refine else None), flush=True)
    else:
        loader = PackedLoader(dataset, data.seq_length, data.micro_batch_size, eod_mask_loss=data.eod_mask_loss,
                              reset_at_document_boundaries=data.reset_at_document_boundaries, **sharding)
    decay_steps = opt.lr_decay_steps or cfg.train_steps
    if opt.warmup_steps >= decay_steps:
        raise ValueError(
            f"optimizer.warmup_steps ({opt.warmup_steps}) must be smaller than the decay steps ({decay_steps}: "
            "optimizer.lr_decay_steps, default train_steps); lower the warmup or train longer"
        )
    if cfg.uses_refine:
        r = cfg.refine
        if par.pipeline_model_parallel_size > 1:
            raise ValueError(
                "REFINE steps need the whole model on one pipeline stage (rollouts decode through every layer): "
                "use pipeline_model_parallel_size=1 with tensor / sequence / data parallelism"
            )
        shortest = min_sequence_length(r.n_chunks, r.margin)
        if data.seq_length < shortest:
            raise ValueError(
                f"REFINE selects {r.n_chunks} positions at least {r.margin} tokens from both ends: data.seq_length "
                f"({data.seq_length}) must be >= {shortest}"
            )
    if par.sequence_parallel and data.seq_length % par.tensor_model_parallel_size != 0:
        raise ValueError(f"with sequence parallelism seq_length ({data.seq_length}) must be divisible by TP")
    cp = par.context_parallel_size
    piece = cp * (par.tensor_model_parallel_size if par.sequence_parallel else 1)
    if data.seq_length % piece != 0:
        raise ValueError(f"context_parallel_size {cp} splits every row into {cp} pieces"
                         f"{' of whole TP shards' if piece > cp else ''}: data.seq_length ({data.seq_length}) must be "
                         f"divisible by {piece}")
    cuda = rt.device.type == "cuda"
    bf16 = cuda if cfg.bf16 is None else cfg.bf16
    dtype = dict(params_dtype=torch.bfloat16, bf16=True) if bf16 else dict(params_dtype=torch.float32)
    model_config = get_config(
        cfg.model.config, tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size, sequence_parallel=par.sequence_parallel,
        context_parallel_size=par.context_parallel_size, use_cpu_initialization=not cuda, deterministic_mode=cfg.deterministic, **dtype, **cfg.model.overrides,
    )
    module = build_model(model_config, dataset.vocab_size)
    if cuda:
        module.cuda()
    distributed_optimizer = cuda if opt.use_distributed_optimizer is None else opt.use_distributed_optimizer
    model = DistributedDataParallel(
        model_config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        module,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay, adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2, clip_grad=opt.clip_grad, bf16=bf16, params_dtype=dtype["params_dtype"],
            use_distributed_optimizer=distributed_optimizer,
        ),
        [model],
        config_overrides={} if opt.decay_norms_and_biases else None,  # None: Megatron's no decay on 1-D / biases
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=opt.lr, min_lr=opt.min_lr, lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=decay_steps, lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=cfg.train_steps, wd_incr_style="constant",
    )
    # Hooks Megatron's schedules call: DP no-sync for all but the last micro-batch, grad finalisation
    # (DP reduce, SP norm reduce, PP embedding sync), loss scaling.
    model_config.no_sync_func = model.no_sync
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    trainer = Trainer(cfg, rt, model, optimizer, scheduler, loader, data.global_batch_size // (data.micro_batch_size * dp))

    ckpt = cfg.checkpoint
    schedule_changes = []
    if start == "finetune":
        load_checkpoint(ckpt.load, module, dataset=dataset, allow_tokenizer_change=ckpt.allow_tokenizer_change)
        # The mixed-precision and distributed optimizers keep fp32 main copies of the weights, taken when
        # they were built: refresh them, or the first step writes the random initial weights back.
        optimizer.reload_model_params()
    elif start == "resume":
        configured = {attr: getattr(scheduler, attr) for attr in SCHEDULE_KEYS}
        trainer.start_step = load_checkpoint(ckpt.load, module, optimizer, scheduler, loader,
                                             allow_tokenizer_change=ckpt.allow_tokenizer_change)
        if trainer.start_step < cfg.train_steps:  # a finished run trains nothing: its schedule does not matter
            names = {**SCHEDULE_KEYS, "lr_decay_steps": "optimizer.lr_decay_steps" + (
                "" if opt.lr_decay_steps else " (train_steps)")}
            schedule_changes = resume_schedule(scheduler, configured, opt.use_checkpoint_opt_param_scheduler, names)
    if rt.is_main:
        print(startup_summary(trainer, model_config, dataset, bf16, start, schedule_changes), flush=True)
    if cfg.uses_refine and cfg.refine.kl_coef > 0:
        trainer.reference = frozen_copy(module)
    return trainer


# The scheduler's settings that a resume compares with the checkpoint's, and the config keys that set them.
SCHEDULE_KEYS = {"max_lr": "optimizer.lr", "min_lr": "optimizer.min_lr", "lr_warmup_steps": "optimizer.warmup_steps",
                 "lr_decay_steps": "optimizer.lr_decay_steps", "lr_decay_style": "optimizer.lr_decay_style",
                 "start_wd": "optimizer.weight_decay", "end_wd": "optimizer.weight_decay"}


def resume_schedule(scheduler: OptimizerParamScheduler, configured: dict, use_checkpoint: bool,
                    names: dict = SCHEDULE_KEYS) -> list[str]:
    """After a resume: the config's schedule (`configured`, the scheduler's values before the load) replaces the
    checkpoint's from the resumed step on, as Megatron-LM's --override-opt_param-scheduler; with `use_checkpoint`
    (its --use-checkpoint-opt_param-scheduler) the checkpoint's stays. Returns the differences, 'key saved -> new'."""
    changes = {}
    for attr, key in names.items():
        saved = getattr(scheduler, attr)
        if saved != configured[attr]:
            changes[key] = f"{key} {saved} -> {configured[attr]}"
            if not use_checkpoint:
                setattr(scheduler, attr, configured[attr])
    if changes:
        # Megatron's param groups carry their own max_lr / min_lr (the load gave them the config's): the scheduler's.
        for group in scheduler.optimizer.param_groups:
            group.update({k: getattr(scheduler, k) for k in ("max_lr", "min_lr") if k in group})
        scheduler.step(increment=0)  # the learning rate and weight decay of the resumed step, by the new schedule
    return list(changes.values())


def startup_summary(trainer: Trainer, model_config, dataset, bf16: bool, start: str | None,
                    schedule_changes: list[str] = ()) -> str:
    """The block rank 0 prints once a run is set up: model, layout, data, step, stage, checkpoints, and on a resume
    the schedule settings that differ from the checkpoint's."""
    from megatron_refine.training.estimate import parameter_count

    cfg, rt, par, data = trainer.cfg, trainer.runtime, trainer.cfg.parallel, trainer.cfg.data
    c = model_config
    params = parameter_count(c, trainer.module.vocab_size)["total"]  # the padded vocabulary, as built
    if data.layout == "prompt_answer":
        content = f"{len(dataset.examples):,d} prompts"
    else:
        meta = dataset.metadata
        content = f"{meta['num_documents']:,d} documents, {meta['num_tokens']:,d} tokens"
    rows = [
        ("model", f"{c.architecture} {cfg.model.config}, {c.num_layers} layers, hidden {c.hidden_size}, "
                  f"{c.num_attention_heads} heads: {params:,d} parameters"),
        ("layout", f"TP {par.tensor_model_parallel_size}, PP {par.pipeline_model_parallel_size}, "
                   f"CP {par.context_parallel_size}, DP {rt.layout.data_parallel_size}, SP {'on' if par.sequence_parallel else 'off'}; "
                   f"{torch.distributed.get_backend()} on {rt.device.type}, {'bf16' if bf16 else 'fp32'}"),
        ("data", f"{data.path or dataset.path} ({data.layout}): {content}"),
        ("step", f"{data.global_batch_size} x {data.seq_length} = {data.global_batch_size * data.seq_length:,d} tokens "
                 f"(micro-batch {data.micro_batch_size}, {trainer.num_microbatches} a rank), {cfg.train_steps} steps"),
    ]
    stage = cfg.stage if cfg.stage in ("pretrain", "refine-mid") else f"{cfg.stage}, prompt_update {cfg.prompt_update}"
    if cfg.uses_refine:
        r = cfg.refine
        stage += (f"; REFINE every {r.every if cfg.stage == 'refine-mid' else 1}: n_chunks {r.n_chunks}, k {r.k}, "
                  f"n {r.n}, {r.selection} selection, {r.reward} reward, loss {r.sft_coef} NTP + {r.ppo_coef} PG"
                  + (f", {r.mini_batches} steps a rollout round" if r.mini_batches > 1 else ""))
    rows.append(("stage", stage))
    ckpt = cfg.checkpoint
    loads = {"finetune": f"weights of {ckpt.load}",
             "resume": f"resume {ckpt.load} at step {trainer.start_step}"}.get(start, "none")
    rows.append(("checkpoints", f"load {loads}; save {ckpt.save or 'none'}"
                 + (f" every {ckpt.save_interval} steps" if ckpt.save and ckpt.save_interval else "")))
    if schedule_changes:
        changes = f"{', '.join(schedule_changes)} (checkpoint -> config)"
        rows.append(("schedule", f"the checkpoint's (optimizer.use_checkpoint_opt_param_scheduler), not the config's: "
                     f"{changes}" if cfg.optimizer.use_checkpoint_opt_param_scheduler else
                     f"the config's from step {trainer.start_step}: {changes}; "
                     "optimizer.use_checkpoint_opt_param_scheduler=true keeps the checkpoint's"))
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"megatron-refine train ({cfg.stage}):"] + [f"  {n:<{width}}  {v}" for n, v in rows])


def checkpoint_start(ckpt: CheckpointArgs, is_main: bool = True) -> str | None:
    """How a run starts: "resume", "finetune" or None (fresh). One command starts and resumes a job (what a
    requeue runs): `load` equal to `save` resumes when a checkpoint is there and starts fresh when none is yet. A
    save folder that holds checkpoints the run would not resume from is refused unless `overwrite` is set."""
    same = bool(ckpt.load and ckpt.save) and Path(ckpt.load).resolve() == Path(ckpt.save).resolve()
    if same and not ckpt.finetune and latest_iteration(ckpt.load) is None:
        if is_main:
            print(f"no checkpoint in {ckpt.load} yet: starting from scratch (checkpoints go there)", flush=True)
        return None
    latest = None if same or not ckpt.save else latest_iteration(ckpt.save)
    if latest is not None and not ckpt.overwrite:
        raise ValueError(
            f"checkpoint.save {ckpt.save} holds checkpoints up to iter {latest}: resume with --load {ckpt.save}, "
            "or pick another checkpoint.save, or pass --overwrite"
        )
    if ckpt.load:
        return "finetune" if ckpt.finetune else "resume"
    return None


def _packing(batch: Batch):
    """The batch's document starts as megatron-core's PackedSeqParams; None: each row is one sequence."""
    return None if batch.cu_seqlens is None else packed_seq_params(batch.cu_seqlens)


def _count_tokens(batches: list[Batch], device: torch.device) -> None:
    """Batches whose losses are means over the step (`Batch.mean_over_step`): the step's update and loss label
    counts over every DP rank, divided by the number of micro-batches, stored in each for `mean_loss`."""
    counts = torch.stack([sum(mask.sum() for mask in masks) for masks in
                          ([b.update_loss_mask for b in batches], [b.loss_mask for b in batches])]).float()
    counts = counts.to(device)
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    for b in batches:
        b.update_tokens, b.loss_tokens = counts / len(batches)


def _ntp_forward_step(trainer: Trainer, answers: bool = False):
    """NTP on the batch's update labels (`Batch.update_loss_mask`), or with `answers` refine-post's SFT step: the
    answer labels (`loss_mask`) given the prompt, a mean over the step's answer labels."""
    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(next(model.parameters()).device)
        batch = batch.piece(parallel_state.get_context_parallel_world_size(),
                            parallel_state.get_context_parallel_rank())
        output = model(batch.tokens, None, None, labels=batch.labels, packed_seq_params=_packing(batch))

        def loss_func(per_token_loss):  # called on the last pipeline stage only
            b = batch.to(per_token_loss.device)
            loss = (mean_loss(per_token_loss, b.loss_mask, b.loss_tokens) if answers else
                    mean_loss(per_token_loss, b.update_loss_mask, b.update_tokens))
            # A copy: the schedule divides the returned loss in place by the number of micro-batches.
            return loss, {"lm loss": context_parallel_sum(loss.detach().clone())}

        return output, loss_func

    return forward_step


def _refine_forward_step(trainer: Trainer, generator: torch.Generator):
    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(next(model.parameters()).device)
        loss, metrics = refine_loss(model.module, batch.tokens, batch.labels, trainer.cfg.refine, generator,
                                    trainer.reference, _packing(batch), loss_mask=batch.update_loss_mask,
                                    eos_id=trainer.loader.dataset.eos_id, lengths=batch.branch_lengths,
                                    ntp_tokens=batch.update_tokens)
        return loss, lambda output: (output, {"lm loss": metrics.pop("ntp_loss"), **metrics})

    return forward_step


def _ppo_update_forward_step(trainer: Trainer):
    """PPO mini-batches: the data iterator yields (batch, its stored rollouts) pairs."""
    def forward_step(data_iterator, model):
        batch, stored = next(data_iterator)
        batch = batch.to(next(model.parameters()).device)
        loss, metrics = ppo_update_loss(model.module, batch.tokens, batch.labels, stored, trainer.cfg.refine,
                                        trainer.reference, _packing(batch), batch.update_loss_mask,
                                        batch.update_tokens)
        return loss, lambda output: (output, {"lm loss": metrics.pop("ntp_loss"), **metrics})

    return forward_step


def _refine_generator(trainer: Trainer, step: int) -> torch.Generator:
    """Same documents, same draws on every TP rank; different per DP rank and step; reproducible on resume. On the
    model's device: torch.multinomial on CUDA probabilities needs a CUDA generator."""
    seed = (trainer.cfg.refine.seed * 1_000_003 + step) * 1009 + parallel_state.get_data_parallel_rank()
    return torch.Generator(trainer.runtime.device).manual_seed(seed)


def collect_rollout_round(trainer: Trainer, step: int) -> list[tuple[list[Batch], list[StoredRollouts]]]:
    """The batches of the next `refine.mini_batches` steps, each micro-batch rolled out by the current policy
    (`rollout_round`): one (batches, stored rollouts) pair per step. The round's select / rollout time is
    reported on its first step (per micro-batch, as an on-policy step reports it), zero on the others."""
    cfg, module = trainer.cfg, trainer.module
    generator = _refine_generator(trainer, step)
    device = next(module.parameters()).device
    steps = []
    for _ in range(cfg.refine.mini_batches):
        batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
        on_device = [b.to(device) for b in batches]
        steps.append((batches, [rollout_round(module, b.tokens, b.labels, cfg.refine, generator, _packing(b),
                                              eos_id=trainer.loader.dataset.eos_id, lengths=b.branch_lengths)
                               for b in on_device]))
    for name in (f"time_{phase}" for phase in STEP_PHASES):
        total = sum(s.metrics[name] for _, stored in steps for s in stored)
        for i, (_, stored) in enumerate(steps):
            for s in stored:
                s.metrics[name] = total / len(stored) if i == 0 else total * 0
    return steps


# Summed over micro-batches and DP ranks, or their maximum; every other metric is averaged.
_SUMMED = ("rollout_tokens",)
_MAXED = ("logprob_diff_max",)


def _reduce_metrics(losses: list[dict], device: torch.device) -> dict[str, float]:
    """Micro-batch metrics of the last stage, shared with the other stages, reduced over DP."""
    names = sorted(losses[0]) if losses else ["lm loss"]
    values = torch.zeros(len(names), device=device)
    for i, name in enumerate(names):
        if losses:
            per_micro = torch.stack([d[name].float().reshape(()) for d in losses])
            values[i] = per_micro.sum() if name in _SUMMED else per_micro.max() if name in _MAXED else per_micro.mean()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(values, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    maxed = torch.tensor([name in _MAXED for name in names], device=device)
    largest = values.clone()
    torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    values = torch.where(maxed, largest, values)
    dp = parallel_state.get_data_parallel_world_size()
    return {name: v.item() / (1 if name in _SUMMED + _MAXED else dp) for name, v in zip(names, values)}


def is_refine_step(cfg: TrainConfig, step: int) -> bool:
    if cfg.stage == "refine-mid":
        return step % cfg.refine.every == 0
    return cfg.uses_refine


def _update(trainer: Trainer, batches: list[Batch], step: int, stored: list[StoredRollouts] | None):
    """The forward step and data of the step's update: NTP, on-policy REFINE, or a PPO update on stored rollouts."""
    if stored is not None:
        return _ppo_update_forward_step(trainer), list(zip(batches, stored))
    if is_refine_step(trainer.cfg, step):
        return _refine_forward_step(trainer, _refine_generator(trainer, step)), batches
    return _ntp_forward_step(trainer), batches


def _optimizer_step(trainer: Trainer, forward_step, data: list, batches: list[Batch], schedule: bool = True
                    ) -> StepResult:
    """Megatron's forward-backward schedule over the micro-batches `data`, then the optimizer (and with `schedule`
    the scheduler) step, or a skipped step when the DP-averaged loss is NaN/Inf."""
    model, optimizer = trainer.model, trainer.optimizer
    model.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = batches[0].tokens
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(data), model=[model], num_microbatches=len(batches),
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=False,
    )
    metrics = _reduce_metrics(losses, next(model.parameters()).device)
    loss = metrics.pop("lm loss")
    if not math.isfinite(loss):  # every rank sees the same DP-averaged loss, so all skip together
        model.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(loss, None, skipped=True, refine=metrics)
    ok, grad_norm, _ = optimizer.step()
    if ok and schedule:
        trainer.scheduler.step(increment=1)
    return StepResult(loss, grad_norm, skipped=not ok, refine=metrics)


def train_step(trainer: Trainer, batches: list[Batch], step: int = 1, stored: list[StoredRollouts] | None = None
               ) -> StepResult:
    """One step on `batches` (micro-batches): NTP, on-policy REFINE, or with `stored` rollouts (one per
    micro-batch, from `collect_rollout_round`) a PPO update of a rollout round. Stage refine-post: the update on
    the prompts (`prompt_update`), then the SFT step on the answers; two optimizer steps, one scheduler step."""
    if batches[0].mean_over_step:
        _count_tokens(batches, next(trainer.model.parameters()).device)
    if trainer.cfg.stage != "refine-post":
        return _optimizer_step(trainer, *_update(trainer, batches, step, stored), batches)
    prompt = None
    if trainer.cfg.prompt_update != "none":
        prompt = _optimizer_step(trainer, *_update(trainer, batches, step, None), batches, schedule=False)
    out = _optimizer_step(trainer, _ntp_forward_step(trainer, answers=True), batches, batches)
    if prompt is not None:
        out.refine, out.prompt_loss, out.prompt_grad_norm = prompt.refine, prompt.loss, prompt.grad_norm
        out.skipped = out.skipped or prompt.skipped
    return out


def train(cfg: TrainConfig, runtime: Runtime | None = None) -> TrainResult:
    trainer = setup(cfg, runtime)
    log = cfg.logging
    logger = MetricsLogger(cfg.train_steps, log.tensorboard_dir, log.wandb_project, cfg.to_dict())
    if trainer.start_step >= cfg.train_steps and trainer.runtime.is_main:  # e.g. a requeue after the run finished
        print(f"{cfg.checkpoint.load} is already at step {trainer.start_step} of train_steps {cfg.train_steps}: "
              "nothing to train (raise train_steps to train on)", flush=True)
    with DistributedSignalHandler(signal.SIGTERM) as terminated:  # from here on SIGTERM saves, then returns
        result = run_steps(trainer, range(trainer.start_step + 1, cfg.train_steps + 1), logger,
                           TrainResult(trainer.module), terminated)
    logger.close()
    if cfg.checkpoint.save:
        unlock_save_folder(cfg.checkpoint.save)
    return result


def run_steps(trainer: Trainer, steps: range, logger: MetricsLogger, result: TrainResult,
              stop: DistributedSignalHandler | None = None) -> TrainResult:
    """Train `steps` (step numbers: they seed REFINE's draws and time the saves), logging each and saving where
    checkpoint.save asks: the training loop of `train`, and of test-time training one batch of prompts at a time.
    Once any rank got `stop`'s signal, all save after the same step (a rollout round's last) and return."""
    cfg, ckpt, log = trainer.cfg, trainer.cfg.checkpoint, trainer.cfg.logging
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_length
    in_a_row = 0
    stopping = False
    rollout_round_left = []  # with refine.mini_batches > 1: the current round's (batches, stored rollouts) per step
    for step in steps:
        start = time.perf_counter()
        stored = None
        if is_refine_step(cfg, step) and cfg.refine.mini_batches > 1:
            rollout_round_left = rollout_round_left or collect_rollout_round(trainer, step)
            batches, stored = rollout_round_left.pop(0)
        else:
            batches = [trainer.loader.next_batch() for _ in range(trainer.num_microbatches)]
            start = time.perf_counter()
        out = train_step(trainer, batches, step, stored)
        seconds = time.perf_counter() - start
        result.step_tokens_per_s.append(tokens_per_step / seconds)
        result.losses.append(out.loss)
        result.skipped_steps += out.skipped
        in_a_row = in_a_row + 1 if out.skipped else 0
        if out.skipped and trainer.runtime.is_main:
            print(f"step {step}: loss is {out.loss}; skipped the update (skipped so far: {result.skipped_steps})", flush=True)
        if in_a_row >= cfg.max_skipped_steps:  # before any save: a diverged run must not replace good checkpoints
            raise TrainingDivergedError(
                f"{in_a_row} steps in a row up to step {step} had a NaN/Inf loss (max_skipped_steps "
                f"{cfg.max_skipped_steps}): lower optimizer.lr or raise warmup, and resume from the last checkpoint"
            )
        metrics = {"loss": out.loss, "lr": trainer.optimizer.param_groups[0]["lr"],
                   "tokens_per_s": result.step_tokens_per_s[-1], "skipped_steps": result.skipped_steps}
        if out.grad_norm is not None:
            metrics["grad_norm"] = out.grad_norm
        if out.prompt_loss is not None:
            metrics["post/prompt_loss"] = out.prompt_loss
            if out.prompt_grad_norm is not None:
                metrics["post/prompt_grad_norm"] = out.prompt_grad_norm
        if out.refine:
            r = out.refine
            r["rollout_tokens_per_s"] = r["rollout_tokens"] / max(r["time_rollout"], 1e-9)
            # The rest of the step: the forwards over the documents, the backward and the optimizer.
            r["time_update"] = seconds - sum(r[f"time_{phase}"] for phase in STEP_PHASES if phase != "forward")
            metrics.update({f"refine/{name}": value for name, value in r.items()})
            result.refine_history.append({"step": step, **r})
            if trainer.runtime.is_main:
                check_logprob_parity(r, cfg.refine.logprob_parity_tolerance, step)
        logger.log(step, metrics, console=step % log.log_interval == 0 or step == cfg.train_steps)
        exiting = bool(cfg.exit_interval) and step % cfg.exit_interval == 0
        stopping = stopping or (stop is not None and stop.received(trainer.runtime.device))
        signalled = stopping and not rollout_round_left  # a round's stored rollouts are not saved: finish it first
        if ckpt.save and (exiting or signalled or (ckpt.save_interval and step % ckpt.save_interval == 0)
                          or step == cfg.train_steps):
            path = save_checkpoint(ckpt.save, step, trainer.module, trainer.optimizer, trainer.scheduler,
                                   trainer.loader, cfg.to_dict(), ckpt.keep_last)
            result.checkpoint = str(path)
        if signalled and step != cfg.train_steps:
            result.stopped_by = stop.name
            if trainer.runtime.is_main:
                print(f"{stop.name}: stopping after step {step}, "
                      + (f"saved {result.checkpoint}; the same command resumes it" if ckpt.save
                         else "nothing saved (no checkpoint.save)"), flush=True)
            break
        if exiting:
            if trainer.runtime.is_main:
                print(f"exit_interval {cfg.exit_interval}: stopping after step {step}", flush=True)
            break
    rates = result.step_tokens_per_s
    result.tokens_per_s = sorted(rates)[len(rates) // 2] if rates else 0.0
    return result


__all__ = ["StepResult", "TrainResult", "Trainer", "TrainingDivergedError", "checkpoint_start", "is_refine_step",
           "prompt_tokenizer", "run_steps", "setup", "train", "train_step"]
