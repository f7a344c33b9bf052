"""`megatron-refine eval`: the examples (generated needle tasks and task files), scored without test-time training
(scoring.py) or with it (ttt.py), on every rank of this run; rank 0 writes the table, results.json and results.csv.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_refine.evaluation.examples import EvalExample
from megatron_refine.evaluation.scoring import evaluate, format_table, summarize, write_results
from megatron_refine.training.model_loading import checkpoint_tokenizer, load_model

if TYPE_CHECKING:
    from megatron_refine.training.config import TrainConfig


def examples_for(tasks: list[str], lengths: list[int], samples: int, tokenizer, seed: int,
                 data: str | None = None, max_prompt_tokens: int | None = None,
                 haystack: str | None = None) -> tuple[list[EvalExample], dict]:
    """The NIAH grid (tasks x lengths x `samples`) and a task file's examples (its first `samples`, all when 0),
    and the file's truncation counts."""
    from megatron_refine.evaluation.niah import NIAH_TASKS, niah_examples

    if samples < 0:  # a negative count would slice a task file from its end
        raise ValueError(f"--samples must be >= 0 (0: all of a task file), got {samples}")
    unknown = [t for t in tasks if t not in NIAH_TASKS]
    if unknown:
        raise ValueError(f"unknown --tasks {unknown}: the generated tasks are {', '.join(NIAH_TASKS)}; other tasks "
                         "come from a task file (--data file.jsonl)")
    examples = [ex for task in tasks for length in lengths
                for ex in niah_examples(task, length, samples, tokenizer, seed, haystack=haystack)]
    report = {}
    if data:
        from megatron_refine.evaluation.jsonl import read_task_file

        file_examples, report = read_task_file(data, tokenizer, max_prompt_tokens)
        examples += file_examples[:samples] if samples else file_examples
    return examples, report


@dataclass
class EvalArgs:
    load: str
    tasks: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=lambda: [4096])
    samples: int = 50
    data: str | None = None
    max_prompt_tokens: int = 16384 - 512  # a task file's prompts are cut to this (the context minus the answer)
    haystack: str | None = None  # a text file for the NIAH filler (default: the built-in corpus)
    tokenizer: str | None = None
    seed: int = 0
    batch_size: int = 8
    max_batch_tokens: int = 65536
    out_dir: str = "eval_output"
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    device: str | None = None
    ttt: str = "none"  # test-time training before answering each batch: refine, ntp or none (evaluation/ttt.py)
    ttt_reset: str = "batch"  # batch: restore weights and optimizer before every batch; never: carry them over
    # The stage-ttt training config (evaluation/ttt.py: `ttt_fields` builds it from `--set`); None: the preset
    # ttt-refine / ttt-ntp. The checkpoint's model and this run's layout replace its own.
    ttt_config: TrainConfig | None = None
    ttt_fit_rows: bool = True  # rows sized to the longest prompt and its answer budget; false: ttt_config's
    ttt_log_per_batch: bool = True  # a log line a batch; false: ttt_config's logging.log_interval


def run(args: EvalArgs) -> list[dict]:
    """Evaluate on this process's runtime (one rank of `--nproc N` or torchrun): returns the summary rows; rank 0
    prints the table and writes results.json / results.csv."""
    from megatron_refine.runtime import destroy, initialize

    runtime = initialize(tp=args.tensor_model_parallel_size, device=args.device)
    try:
        if args.ttt == "none":
            model, tokenizer = load_model(args.load, args.tokenizer, args.sequence_parallel)
        else:
            tokenizer = checkpoint_tokenizer(args.load, args.tokenizer)
        haystack = Path(args.haystack).read_text() if args.haystack else None
        examples, truncated = examples_for(args.tasks, args.lengths, args.samples, tokenizer, args.seed, args.data,
                                           args.max_prompt_tokens, haystack)
        if not examples:
            raise ValueError("nothing to evaluate: pass --tasks (e.g. niah_single) and / or --data file.jsonl")
        config = {**asdict(args), "truncated": truncated}
        if args.ttt == "none":
            results = evaluate(model, tokenizer, examples, batch_size=args.batch_size,
                               max_batch_tokens=args.max_batch_tokens)
        else:
            from megatron_refine.evaluation.ttt import run_test_time_training, write_ttt_results

            ttt = run_test_time_training(args, examples, tokenizer, runtime)
            baseline, results = ttt.baseline, ttt.results
            config["ttt_prompts_without_refine"] = ttt.without_refine
        rows = summarize(results)
        if torch.distributed.get_rank() == 0:
            if args.ttt == "none":
                write_results(args.out_dir, results, rows, config)
                print(format_table(rows), flush=True)
            else:
                print(write_ttt_results(args.out_dir, baseline, results, config), flush=True)
            if truncated.get("truncated"):
                print(f"prompts cut to {args.max_prompt_tokens} tokens: {truncated}", flush=True)
            print(f"wrote {Path(args.out_dir) / 'results.json'} and results.csv"
                  + (f" (no TTT: {Path(args.out_dir) / 'no-ttt'}/)" if args.ttt != "none" else ""), flush=True)
        return rows
    finally:
        destroy()
