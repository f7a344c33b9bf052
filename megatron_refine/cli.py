"""`megatron-refine` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

# Errors a user causes and their message explains (a bad config, data, checkpoint or parallel layout, a run that
# diverged; the project's own, such as DataError, subclass ValueError): one line on stderr and exit code 2. Any
# other exception is a bug and keeps its traceback. By qualified name: a rank's error arrives as names
# (RankFailed.error_bases), and telling them apart imports nothing (checkpointing pulls in megatron-core,
# seconds before a preprocess error would show).
KNOWN_ERRORS = ("ValueError", "FileNotFoundError", "megatron_refine.training.checkpoint_format.CheckpointError",
                "megatron_refine.training.trainer.TrainingDivergedError")
DEBUG_HELP = "show the full traceback of an error (default: its message, one line)"


def _error_line(error: Exception) -> str | None:
    """The message of a known error, raised here or by a rank (RankFailed under --nproc); None for a bug."""
    launch = sys.modules.get("megatron_refine.runtime.launch")  # loaded wherever a RankFailed can come from
    if launch and isinstance(error, launch.RankFailed):
        names, message = set(error.error_bases), error.error_message or error.error_type
    else:
        names = {c.__qualname__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}"
                 for c in type(error).__mro__}
        message = str(error) or type(error).__name__
    return message if names & set(KNOWN_ERRORS) else None


def _info(args: argparse.Namespace) -> None:
    """What this installation can use: packages, CUDA, and which fast paths are available."""
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rows = {
        "megatron-refine": version("megatron-refine"),
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "flash-linear-attention": version("flash-linear-attention"),
        "transformer-engine": version("transformer-engine"),
        "apex": "installed" if importlib.util.find_spec("apex") else "not installed",
        "CUDA": f"{torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "not available",
        "backend": "nccl" if torch.cuda.is_available() else "gloo (CPU compatibility patches)",
    }
    width = max(map(len, rows))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows.items()))


def _demo(args: argparse.Namespace) -> None:
    from megatron_refine.demo import DemoConfig, run

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    run(DemoConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}))


def _model_info(args: argparse.Namespace) -> None:
    """Build a model config on the meta device and print its parameter counts."""
    from megatron_refine.models import PUBLISHED_VOCAB_SIZE, get_config
    from megatron_refine.models.summary import parameter_counts
    from megatron_refine.runtime import destroy, initialize

    config = get_config(args.config)  # a bad name fails here, before any process group exists
    initialize()
    try:
        counts = parameter_counts(config, args.vocab_size or PUBLISHED_VOCAB_SIZE)
    finally:
        destroy()
    print(f"{args.config}: {config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}")
    for name, n in counts.items():
        print(f"  {name:<14} {n:>15,d}  ({n / 1e9:.3f}B)")


def _train_and_report(cfg) -> None:
    from megatron_refine.training import train

    result = train(cfg)
    if torch_rank() == 0 and result.losses:  # none: the checkpoint was already at train_steps (the trainer said so)
        print(f"{'stopped by ' + result.stopped_by if result.stopped_by else 'done'}: {len(result.losses)} steps, "
              f"final loss {result.losses[-1]:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s, skipped {result.skipped_steps}, checkpoint {result.checkpoint}")


def torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _train(args: argparse.Namespace) -> None:
    """Runs in this process under torchrun; `--nproc N` starts N local ranks itself."""
    from megatron_refine.runtime import local_gpus, spawn
    from megatron_refine.training import load_config

    flags = [f"checkpoint.load={args.load}"] if args.load else []
    flags += [f"stage={args.stage}"] if args.stage else []
    flags += ["checkpoint.finetune=true"] if args.finetune else []
    flags += ["checkpoint.overwrite=true"] if args.overwrite else []
    flags += ["deterministic=true"] if args.deterministic else []
    cfg = load_config(args.config, [*args.set, *flags])
    if cfg.checkpoint.finetune and not cfg.checkpoint.load:
        raise ValueError("--finetune needs --load PATH (the checkpoint folder to take the weights from)")
    if args.dry_run:
        return _dry_run(cfg)
    gpus = local_gpus(cfg.device)
    if gpus and args.nproc > gpus and "RANK" not in os.environ:
        raise ValueError(f"--nproc {args.nproc} needs {args.nproc} GPUs (one per rank), this host has {gpus}: "
                         f"use --nproc {gpus}, or --set device=cpu")
    if args.nproc > 1 and "RANK" not in os.environ:
        spawn(_train_and_report, args.nproc, cfg, timeout=7 * 24 * 3600)
    else:
        _train_and_report(cfg)


def _dry_run(cfg) -> None:
    """Resolve and check a training config without data or devices: the model config at its parallel layout, the
    parameters counted on the meta device, the tokens a step; print them and the resolved config as YAML."""
    import json

    import yaml

    from megatron_refine.models import PUBLISHED_VOCAB_SIZE, get_config
    from megatron_refine.models.summary import parameter_counts
    from megatron_refine.runtime import destroy, initialize

    par, data = cfg.parallel, cfg.data
    model = get_config(cfg.model.config, tensor_model_parallel_size=par.tensor_model_parallel_size,
                       pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                       sequence_parallel=par.sequence_parallel, **cfg.model.overrides)  # the layout's checks
    metadata = Path(data.path or ".") / "metadata.json"
    vocab = json.loads(metadata.read_text())["vocab_size"] if data.path and metadata.is_file() else PUBLISHED_VOCAB_SIZE
    initialize(device="cpu")
    try:
        counts = parameter_counts(get_config(cfg.model.config, **cfg.model.overrides), vocab)
    finally:
        destroy()
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    rounds = cfg.refine.mini_batches if cfg.uses_refine else 1
    print(f"# dry run: {cfg.stage}, {model.architecture} {cfg.model.config}: {counts['total']:,d} parameters (vocabulary "
          f"{vocab:,d}), TP {par.tensor_model_parallel_size} PP {par.pipeline_model_parallel_size} SP "
          f"{par.sequence_parallel}; {data.global_batch_size} x {data.seq_length} = "
          f"{data.global_batch_size * data.seq_length:,d} tokens a step"
          + (f", {rounds * data.global_batch_size} documents a rollout round of {rounds} steps" if rounds > 1 else "")
          + ("" if data.path else "; data.path is not set (needed to train)"))


def _eval(args: argparse.Namespace) -> None:
    """Runs in this process under torchrun; `--nproc N` starts N local ranks itself."""
    from megatron_refine.evaluation.runner import EvalArgs, run
    from megatron_refine.evaluation.ttt import ttt_fields
    from megatron_refine.runtime import spawn
    from megatron_refine.training import load_config

    known = ("parallel.tensor_model_parallel_size", "parallel.sequence_parallel", "device")
    ttt_sets = [item for item in args.set if item.split("=", 1)[0].strip() not in known]
    if ttt_sets and args.ttt == "none":
        raise ValueError(f"eval takes --set {', '.join(known)} only, got {ttt_sets}; other keys set the test-time "
                         "training config (with --ttt refine or ntp)")
    # --set parsed here once, with train's parsing and checks: a bad key fails before any rank starts
    ttt = ttt_fields(args.ttt, args.set) if args.ttt != "none" else {"ttt": "none"}
    parsed = ttt.get("ttt_config") or load_config(None, args.set)
    split = lambda text, kind: [kind(x) for x in text.split(",") if x] if text else []  # noqa: E731
    options = EvalArgs(
        load=args.load, tasks=split(args.tasks, str), lengths=split(args.lengths, int) or [4096],
        samples=args.samples, data=args.data, max_prompt_tokens=args.max_prompt_tokens, haystack=args.haystack,
        tokenizer=args.tokenizer, seed=args.seed, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
        out_dir=args.out_dir, tensor_model_parallel_size=parsed.parallel.tensor_model_parallel_size,
        sequence_parallel=parsed.parallel.sequence_parallel, device=parsed.device, ttt_reset=args.ttt_reset, **ttt)
    if args.nproc > 1 and "RANK" not in os.environ:
        spawn(run, args.nproc, options, timeout=7 * 24 * 3600)
    else:
        run(options)


def _parquet_to_jsonl(args: argparse.Namespace) -> None:
    from megatron_refine.data.prompt_answer import parquet_to_jsonl

    count = parquet_to_jsonl(args.input, args.output, args.task, args.metric, args.max_new_tokens)
    print(f"wrote {args.output}: {count} prompts with answers")


def _preprocess(args: argparse.Namespace) -> None:
    from megatron_refine.data.preprocess import run

    run(args)


def _in_cpu_runtime(job, *args, **kwargs):
    """Run a conversion in this one process on a CPU runtime (the model is rebuilt at TP=1 PP=1)."""
    from megatron_refine.runtime import destroy, initialize

    initialize(device="cpu")
    try:
        return job(*args, **kwargs)
    finally:
        destroy()


def _convert_to_hf(args: argparse.Namespace) -> None:
    from megatron_refine.conversion import export_to_hf

    files = _in_cpu_runtime(export_to_hf, args.load, args.save, iteration=args.iteration, tokenizer=args.tokenizer,
                            dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.save}: {', '.join(files)}")


def _convert_from_hf(args: argparse.Namespace) -> None:
    from megatron_refine.conversion import import_from_hf

    folder = _in_cpu_runtime(import_from_hf, args.load, args.save, tp=args.tp, pp=args.pp, overwrite=args.overwrite)
    print(f"wrote {folder} and {os.path.join(args.save, 'model_config.yaml')}; fine-tune with: megatron-refine train "
          f"--config {os.path.join(args.save, 'model_config.yaml')} --finetune --load {args.save} --set data.path=...")


def build_parser() -> argparse.ArgumentParser:
    from megatron_refine.arguments import at_least, non_negative_int, positive_int

    parser = argparse.ArgumentParser(
        prog="megatron-refine",
        description="Fast-weight language models (DeltaNet, LaCT) trained with REFINE on megatron-core.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' known-harmless warnings too (or MEGATRON_REFINE_SHOW_WARNINGS=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the end-to-end demo on built-in data (the README's main job)")
    demo.add_argument("--steps", type=positive_int, help="NTP pretraining steps (default 800)")
    demo.add_argument("--continue-steps", dest="continue_steps", type=positive_int,
                      help="steps of each continuation, REFINE and matched NTP (default 100)")
    demo.add_argument("--nproc", type=positive_int, help="local data-parallel processes (default 2 on CPU, one per GPU up to 2)")
    demo.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    demo.add_argument("--documents", type=positive_int, help="documents in the built-in corpus (default 20000)")
    demo.add_argument("--eval-samples", dest="eval_samples", type=positive_int,
                      help="held-out examples of each recall task (default 100)")
    demo.add_argument("--post-steps", dest="post_steps", type=positive_int,
                      help="steps of each post-training run, nested REFINE and plain SFT (default 60)")
    demo.add_argument("--qa-samples", dest="qa_samples", type=positive_int,
                      help="held-out questions of each QA task, answered with test-time training (default 50)")
    demo.add_argument("--out-dir", dest="out_dir", help="where outputs go (default demo_output)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="NTP pretraining; REFINE mid-training, post-training or test-time training with --stage")
    train.add_argument("--config", help="a YAML file or a built-in name (tiny-deltanet, tiny-lact, the paper's "
                       "{refine,ntp}-mid-{deltanet-1p3b,lact-760m}, {refine,ntp,sft}-post-{deltanet-1p3b,lact-760m}, "
                       "ttt-refine, ttt-ntp)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. --set optimizer.lr=1e-3 --set data.path=shards/")
    train.add_argument("--stage", choices=["pretrain", "refine-mid", "refine-post", "ttt"],
                       help="pretrain (NTP), refine-mid (NTP interleaved with REFINE steps, see refine.every), "
                       "refine-post (per batch: prompt_update on the prompts, then SFT on the answers), ttt (the "
                       "prompt update only); the last two read data.layout=prompt_answer")
    train.add_argument("--load", help="resume from this checkpoint folder (checkpoint.load)")
    train.add_argument("--finetune", action="store_true", help="with --load: model weights only, from step 0")
    train.add_argument("--overwrite", action="store_true",
                       help="start from scratch in a checkpoint.save folder that holds checkpoints (without --load)")
    train.add_argument("--nproc", type=positive_int, default=1, help="local processes to start (without torchrun)")
    train.add_argument("--deterministic", action="store_true",
                       help="bitwise-reproducible runs (deterministic kernels; slower on GPU)")
    train.add_argument("--dry-run", dest="dry_run", action="store_true",
                       help="check and print the resolved config and the model's size, then exit (no data, no GPU)")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="greedy answers to RULER-style needle tasks and task files, scored")
    evaluate.add_argument("--load", required=True, help="checkpoint folder (any TP/PP/DP layout it was saved at)")
    evaluate.add_argument("--tasks", default="", help="comma-separated: niah_single,niah_multikey,niah_multiquery,"
                          "niah_multivalue")
    evaluate.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens (default 4096)")
    evaluate.add_argument("--samples", type=non_negative_int, default=50,
                          help="examples per task and length (default 50); with --data, the file's first N (0: all)")
    evaluate.add_argument("--data", help="a task file: jsonl of {prompt, answers | answer, task, max_new_tokens?}")
    evaluate.add_argument("--max-prompt-tokens", dest="max_prompt_tokens", type=at_least(2), default=16384 - 512,
                          help="task-file prompts longer than this are cut in the middle, as LongBench does")
    evaluate.add_argument("--haystack", help="a text file for the needle tasks' filler (default: the built-in corpus)")
    evaluate.add_argument("--tokenizer", help="byte or a tokenizer.json (default: the one the training data recorded)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the generated examples")
    evaluate.add_argument("--batch-size", dest="batch_size", type=positive_int, default=8, help="prompts decoded together")
    evaluate.add_argument("--max-batch-tokens", dest="max_batch_tokens", type=positive_int, default=65536,
                          help="prompt tokens packed into one forward at most (lower it when memory is short)")
    evaluate.add_argument("--out-dir", dest="out_dir", default="eval_output", help="results.json, results.csv")
    evaluate.add_argument("--nproc", type=positive_int, default=1, help="local processes (data / tensor parallel)")
    evaluate.add_argument("--ttt", choices=["refine", "ntp", "none"], default="none",
                          help="test-time training on each batch of --batch-size prompts before answering it: REFINE "
                          "(NTP + 0.4 PG, binary reward) or NTP (default none)")
    evaluate.add_argument("--ttt-reset", dest="ttt_reset", choices=["batch", "never"], default="batch",
                          help="batch: restore weights and optimizer state before every batch (default); never: "
                          "carry them over the stream in file order, as the release does")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="parallel.tensor_model_parallel_size=N, parallel.sequence_parallel=true, device=cpu; "
                          "with --ttt any training key, e.g. optimizer.lr=1e-5 (the presets ttt-refine / ttt-ntp)")
    evaluate.set_defaults(func=_eval)

    from megatron_refine.data.preprocess import add_arguments as add_preprocess_arguments

    preprocess = sub.add_parser("preprocess", help="text / jsonl (or the built-in corpus) -> tokenized webdataset shards")
    add_preprocess_arguments(preprocess)
    preprocess.set_defaults(func=_preprocess)

    model_info = sub.add_parser("model-info", help="parameter counts of a model config (built on the meta device)")
    model_info.add_argument(
        "--config", required=True, help="model config name (megatron_refine.models.PRESETS): deltanet_1p3b, gated_deltanet_1p3b, lact_760m, ..."
    )
    model_info.add_argument("--vocab-size", type=positive_int, help="tokenizer vocabulary (default 32000, the published models')")
    model_info.set_defaults(func=_model_info)

    to_hf = sub.add_parser("convert-to-hf", help="a checkpoint (any TP/PP) -> a Hugging Face folder (DeltaNet, Gated DeltaNet: fla's delta_net, gated_deltanet; LaCT: lact_swiglu)")
    to_hf.add_argument("--load", required=True, help="checkpoint folder (holding iter_NNNNNNN/ and the latest marker)")
    to_hf.add_argument("--save", required=True, help="Hugging Face folder to write")
    to_hf.add_argument("--iteration", type=non_negative_int, help="which iter_NNNNNNN to export (default: the latest)")
    to_hf.add_argument("--tokenizer", help="tokenizer.json (or its folder) to ship with the model; 'byte' writes none")
    to_hf.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="weights dtype (default fp32)")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="replace a --save folder that holds files (an earlier export) whole")
    to_hf.set_defaults(func=_convert_to_hf)

    from_hf = sub.add_parser("convert-from-hf", help="a Hugging Face delta_net or gated_deltanet (fla) or lact_swiglu (LaCT) folder -> a Megatron checkpoint")
    from_hf.add_argument("--load", required=True, help="Hugging Face folder (config.json + safetensors)")
    from_hf.add_argument("--save", required=True, help="checkpoint folder to write (iter_0000000/, model_config.yaml)")
    from_hf.add_argument("--tp", type=positive_int, default=1, help="the TP size to fine-tune at: checked against the heads")
    from_hf.add_argument("--pp", type=positive_int, default=1, help="the PP size to fine-tune at: checked against the layers")
    from_hf.add_argument("--overwrite", action="store_true",
                         help="replace a --save folder that holds files (e.g. a training run's checkpoints) whole")
    from_hf.set_defaults(func=_convert_from_hf)

    to_jsonl = sub.add_parser("parquet-to-jsonl", help="RULER QA parquet (the REFINE release's: prompt, answer) -> a "
                              "prompt / answer jsonl for data.layout=prompt_answer")
    to_jsonl.add_argument("--input", required=True, help="a .parquet file with 'prompt' and 'answer' (list) columns")
    to_jsonl.add_argument("--output", required=True, help="the .jsonl to write")
    to_jsonl.add_argument("--task", help="a task name for every line (e.g. ruler_squad): then also an eval task file")
    to_jsonl.add_argument("--metric", help="the metric of every line (default: the task's, e.g. ruler_substring)")
    to_jsonl.add_argument("--max-new-tokens", dest="max_new_tokens", type=positive_int, help="the answer budget of every line")
    to_jsonl.set_defaults(func=_parquet_to_jsonl)

    info = sub.add_parser("info", help="show versions, CUDA and the fast paths available")
    info.set_defaults(func=_info)
    for command in sub.choices.values():  # `--debug` after the subcommand too; SUPPRESS keeps one given before
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show the libraries' known-harmless warnings too")
    return parser


def main(argv: list[str] | None = None) -> None:
    from megatron_refine.warnings import SHOW_ENV, filter_library_warnings

    if "--verbose" in (sys.argv[1:] if argv is None else argv):  # before parsing: building the parser imports
        os.environ[SHOW_ENV] = "1"  # libraries; the ranks this process starts inherit it
    filter_library_warnings()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:
        line = None if args.debug else _error_line(e)
        if line is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks for all (they mostly fail alike)
            print(f"megatron-refine: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
