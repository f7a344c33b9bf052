"""Test-time training (`megatron-refine eval --ttt refine|ntp`): adapt to each batch of test prompts, then answer.

The test examples are taken in file order, `--batch-size` at a time. For each batch the checkpoint's model is
trained on the batch's prompts (no answers) through the training loop itself (`training.trainer.run_steps`, stage
ttt): `--ttt refine` one REFINE rollout round over the batch, NTP x 1.0 + PG x 0.4 with the binary reward, in
optimizer steps of `data.global_batch_size` prompts (the release: 8 prompts, 2 steps of 4); `--ttt ntp` the same
steps with NTP only. Then the batch is answered greedily by the cached decoder and scored, exactly as plain `eval`
would score that model: so a batch's result equals `train --stage ttt` on its prompts followed by `eval`. A final
partial batch is answered too; its training steps cycle through its prompts to fill them, as the loader wraps.

`--ttt-reset batch` (default, the clean evaluation) restores the weights, the optimizer state and the scheduler
before every batch (`TrainingState`); `--ttt-reset never` carries them over the whole stream, as the release does.
The model as loaded is scored first on every example, in the same dtype, for the no-TTT column beside TTT's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_refine.data.prompt_answer import PromptAnswerDataset, PromptAnswerLoader
from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.scoring import evaluate, format_comparison, summarize, write_results

def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers under Megatron's wrappers (one per chained optimizer): their params are the main weights."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _copy(value):
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


@dataclass
class TrainingState:
    """A copy of everything a training step changes: the model's weights, each optimizer's main weights, moments,
    step counts and group settings, and the scheduler's position. `restore` writes it back bitwise, in place."""

    weights: list[torch.Tensor]
    optimizers: list[tuple[list[dict], list[list[torch.Tensor]], dict]]
    scheduler_steps: int

    @classmethod
    def capture(cls, trainer) -> "TrainingState":
        optimizers = []
        for opt in _torch_optimizers(trainer.optimizer):
            groups = [{k: _copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            main = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
            state = {p: {k: _copy(v) for k, v in s.items()} for p, s in opt.state.items()}
            optimizers.append((groups, main, state))
        return cls([p.detach().clone() for p in trainer.module.parameters()], optimizers, trainer.scheduler.num_steps)

    @torch.no_grad()
    def restore(self, trainer) -> None:
        for p, saved in zip(trainer.module.parameters(), self.weights):
            p.copy_(saved)
        for opt, (groups, main, state) in zip(_torch_optimizers(trainer.optimizer), self.optimizers):
            for group, saved_group, saved_main in zip(opt.param_groups, groups, main):
                group.update({k: _copy(v) for k, v in saved_group.items()})
                for p, saved in zip(group["params"], saved_main):
                    p.copy_(saved)
            opt.state.clear()
            for p, saved in state.items():
                opt.state[p] = {k: _copy(v) for k, v in saved.items()}
        trainer.scheduler.num_steps = self.scheduler_steps


def ttt_fields(ttt: str, sets: list[str]) -> dict:
    """EvalArgs' test-time training fields from `--set key=value` strings (the CLI and recipe edge): the preset
    ttt-refine / ttt-ntp with the overrides, checked as train checks them. Rows are sized to the prompts, and the
    log has a line a batch, unless `sets` name data.seq_length / logging.log_interval."""
    from megatron_refine.training import load_config

    keys = {item.split("=", 1)[0].strip() for item in sets}
    return {"ttt": ttt, "ttt_config": load_config(f"ttt-{ttt}", sets), "ttt_fit_rows": "data.seq_length" not in keys,
            "ttt_log_per_batch": "logging.log_interval" not in keys}


def ttt_config(args, examples: list[EvalExample], tokenizer):
    """The stage-ttt training config of `--ttt`: `args.ttt_config` (default the preset ttt-refine / ttt-ntp) on the
    checkpoint's model and eval's parallel layout; rows long enough for the longest prompt and an answer budget,
    unless `args.ttt_fit_rows` is off. One round (refine.mini_batches steps) per batch of --batch-size."""
    from megatron_refine.refine import min_sequence_length
    from megatron_refine.training import load_config
    from megatron_refine.training.model_loading import checkpoint_bf16, checkpoint_model

    common, model = checkpoint_model(args.load)
    cuda = args.device == "cuda" if args.device else torch.cuda.is_available()
    cfg = args.ttt_config or load_config(f"ttt-{args.ttt}")
    per_step = cfg.data.global_batch_size
    if args.batch_size < 1 or args.batch_size % per_step:
        raise ValueError(f"--batch-size {args.batch_size} must be a positive multiple of data.global_batch_size "
                         f"({per_step}, the prompts of one TTT optimizer step)")
    steps = args.batch_size // per_step
    batches = -(-len(examples) // args.batch_size)
    refine = replace(cfg.refine, mini_batches=steps) if cfg.prompt_update == "refine" else cfg.refine  # a round a batch
    seq_length = cfg.data.seq_length
    if args.ttt_fit_rows:
        longest = max(len(tokenizer.encode(ex.prompt)) for ex in examples) + cfg.data.max_answer_tokens
        seq_length = max(min_sequence_length(refine.n_chunks, refine.margin), -(-longest // 64) * 64)
    cfg = replace(
        cfg, train_steps=steps * batches, refine=refine, device=args.device or cfg.device,
        bf16=checkpoint_bf16(common, cuda) if cfg.bf16 is None else cfg.bf16,  # as plain eval loads it (no-TTT column)
        model=replace(cfg.model, config=model["config"],
                      overrides={**model.get("overrides", {}), **cfg.model.overrides}),
        checkpoint=replace(cfg.checkpoint, load=cfg.checkpoint.load or args.load, finetune=True),
        parallel=replace(cfg.parallel, tensor_model_parallel_size=args.tensor_model_parallel_size,
                         sequence_parallel=args.sequence_parallel),
        data=replace(cfg.data, seq_length=seq_length),
        logging=replace(cfg.logging, log_interval=steps) if args.ttt_log_per_batch else cfg.logging)
    cfg.validate()
    if examples and prompts_without_refine(cfg, examples, tokenizer) == len(examples):
        margin = cfg.refine.margin
        raise ValueError(f"--ttt refine: every prompt is at most {2 * margin + 1} tokens, too short for a REFINE "
                         f"rollout (refine.margin={margin} tokens from both ends), so the update would be NTP alone: use "
                         f"--ttt ntp, or --set refine.margin=M with M >= refine.k ({cfg.refine.k}) and 2M + 1 below "
                         "the prompts' length")
    return cfg


def _dataset(cfg, examples: list[EvalExample], tokenizer) -> PromptAnswerDataset:
    data = cfg.data
    return PromptAnswerDataset.from_texts([ex.prompt for ex in examples], [None] * len(examples), tokenizer,
                                          data.seq_length, data.max_answer_tokens, data.prompt_truncation)


def prompts_without_refine(cfg, examples: list[EvalExample], tokenizer) -> int:
    """How many prompts are too short for a REFINE rollout at cfg's margins (their update is NTP alone); 0 for
    --ttt ntp."""
    if cfg.prompt_update != "refine":
        return 0
    return _dataset(cfg, examples, tokenizer).without_refine_positions(cfg.refine.margin)


def batch_loader(cfg, examples: list[EvalExample], tokenizer) -> PromptAnswerLoader:
    """This rank's loader over one batch's prompts, in their order, wrapping around (no answers: test time)."""
    from megatron.core import parallel_state

    data = cfg.data
    return PromptAnswerLoader(_dataset(cfg, examples, tokenizer), data.seq_length, data.micro_batch_size,
                              dp_rank=parallel_state.get_data_parallel_rank(),
                              dp_size=parallel_state.get_data_parallel_world_size(), seed=data.seed, shuffle=False)


@dataclass
class TTTRun:
    baseline: list[dict]  # every example's result from the model as loaded (no TTT), in the examples' order
    results: list[dict]  # ... after TTT on its batch ("ttt_batch": the batch's index)
    trainer: object  # the training state after the last batch
    without_refine: int = 0  # --ttt refine: prompts too short for a rollout, whose update was NTP alone


def run_test_time_training(args, examples: list[EvalExample], tokenizer, runtime) -> TTTRun:
    """The examples' results without TTT and with it (in the examples' order, on every rank)."""
    from megatron_refine.training.logger import MetricsLogger
    from megatron_refine.training.trainer import TrainResult, run_steps, setup

    cfg = ttt_config(args, examples, tokenizer)
    short = prompts_without_refine(cfg, examples, tokenizer)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    trainer = setup(cfg, runtime, dataset=batch_loader(cfg, batches[0], tokenizer).dataset)
    model = trainer.module
    baseline = evaluate(model, tokenizer, examples, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                        progress=False)
    start = TrainingState.capture(trainer)
    logger, log = MetricsLogger(cfg.train_steps), TrainResult(model)
    steps = cfg.train_steps // len(batches)
    results = []
    if runtime.is_main:
        print(f"test-time training ({cfg.prompt_update}, reset {args.ttt_reset}): {len(batches)} batches of up to "
              f"{args.batch_size} prompts, {steps} optimizer steps of {cfg.data.global_batch_size} each, rows of "
              f"{cfg.data.seq_length} tokens", flush=True)
        if short:
            print(f"{short} of {len(examples)} prompts are at most {2 * cfg.refine.margin + 1} tokens, too short for a "
                  f"REFINE rollout (refine.margin={cfg.refine.margin} at both ends): their update is NTP alone",
                  flush=True)
    for i, batch in enumerate(batches):
        if args.ttt_reset == "batch" and i:
            start.restore(trainer)
        trainer.loader = batch_loader(cfg, batch, tokenizer)
        run_steps(trainer, range(i * steps + 1, (i + 1) * steps + 1), logger, log)
        first = i * args.batch_size
        for r in evaluate(model, tokenizer, batch, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                          progress=False):
            results.append({**r, "index": first + r["index"], "ttt_batch": i})
    logger.close()
    return TTTRun(baseline, results, trainer, short)


def write_ttt_results(out_dir: str | Path, baseline: list[dict], results: list[dict], config: dict) -> str:
    """results.json / .csv of TTT in out_dir and of the model as loaded in out_dir/no-ttt; the side-by-side table."""
    rows, base_rows = summarize(results), summarize(baseline)
    write_results(out_dir, results, rows, config)
    write_results(Path(out_dir) / "no-ttt", baseline, base_rows, {**config, "ttt": "none"})
    short = config.get("ttt_prompts_without_refine")
    label = f"TTT {config['ttt']} (reset {config['ttt_reset']}{f', {short} NTP only' if short else ''})"
    return format_comparison({"no TTT": base_rows, label: rows})


__all__ = ["TTTRun", "TrainingState", "batch_loader", "prompts_without_refine", "run_test_time_training",
           "ttt_config", "ttt_fields", "write_ttt_results"]
