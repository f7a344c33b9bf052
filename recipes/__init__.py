"""NeMo-Run recipes: REFINE mid-training at 1.3B and past it, laid out for nodes of 8 x H100-80GB.

A recipe is a `Recipe`: the training preset, the `--set` overrides of its layout (TP / SP / DP), and the nodes
it is sized for (REFINE takes no activation recomputation: a recomputed layer would detach its branch states).
Each layout is the smallest TP (inside a node) whose estimate stays under `FIT_GIB` (60 GiB) a GPU, or the largest
TP the heads allow; past 16K tokens, the smallest TP x CP (context parallelism) that fits, `longest_document`'s
choice (docs/scaling.md justifies each with `tools/estimate.py`). `recipe.task()` is the NeMo-Run task
(`run.Script` of `python -m megatron_refine.cli train ...`), `executors.local_executor` / `slurm_executor` the
executors, and `python -m recipes` the command line (`--list`, `NAME --executor local|slurm --dryrun`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GPUS_PER_NODE = 8


@dataclass
class Recipe:
    name: str
    description: str
    config: str  # a built-in training config (megatron_refine.training.config.NAMED_CONFIGS)
    model: str  # a model preset (megatron_refine.models.PRESETS)
    nodes: int = 1
    gpus_per_node: int = GPUS_PER_NODE
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    sets: list[str] = field(default_factory=list)  # further `--set` overrides (data, checkpoints, steps)
    vocab_size: int | None = None  # its checkpoint's vocabulary, for the estimate (None: the published 32,000)

    def overrides(self, nodes: int | None = None) -> list[str]:
        """The `--set` overrides of this recipe: its model and layout, then `sets`."""
        return [f"model.config={self.model}",
                f"parallel.tensor_model_parallel_size={self.tensor_model_parallel_size}",
                f"parallel.pipeline_model_parallel_size={self.pipeline_model_parallel_size}",
                f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.context_parallel_size={self.context_parallel_size}", *self.sets]

    def arguments(self, extra: list[str] = ()) -> list[str]:
        """`megatron_refine.cli`'s arguments: train --config C --set ... (recipe's, then `extra`). Relative paths
        are made absolute from this directory: the job runs elsewhere (srun's working directory is NeMo-Run's)."""
        sets = [_absolute(s) for s in [*self.overrides(), *extra]]
        return ["train", "--config", self.config, *[a for s in sets for a in ("--set", s)]]

    def resolve(self, extra: list[str] = (), nodes: int | None = None):
        """The training config this recipe runs, checked as `megatron-refine train` checks it, plus the layout
        checks that need the world size: heads by TP, layers by PP, the global batch by DP x micro-batch (DP: the
        GPUs over TP x PP x CP)."""
        from megatron_refine.models import get_config
        from megatron_refine.training import load_config

        cfg = load_config(self.config, [*self.overrides(), *extra])
        par, data = cfg.parallel, cfg.data
        get_config(cfg.model.config, tensor_model_parallel_size=par.tensor_model_parallel_size,
                   pipeline_model_parallel_size=par.pipeline_model_parallel_size,
                   sequence_parallel=par.sequence_parallel, **cfg.model.overrides)
        gpus = (nodes or self.nodes) * self.gpus_per_node
        model_parallel = (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                          * par.context_parallel_size)
        if gpus % model_parallel:
            raise ValueError(f"{self.name}: {gpus} GPUs do not divide into TP x PP x CP = {model_parallel}")
        dp = gpus // model_parallel
        if data.global_batch_size % (data.micro_batch_size * dp):
            raise ValueError(f"{self.name}: data.global_batch_size {data.global_batch_size} is not a multiple of "
                             f"data.micro_batch_size x DP = {data.micro_batch_size} x {dp} on {gpus} GPUs")
        return cfg

    def task(self, extra: list[str] = ()):
        """The NeMo-Run task: `python -m megatron_refine.cli train ...` (torchrun adds the ranks)."""
        import nemo_run as run

        return run.Script(path="megatron_refine.cli", entrypoint="python", m=True, args=self.arguments(extra))


PATH_KEYS = ("data.path", "checkpoint.load", "checkpoint.save", "logging.tensorboard_dir")


def _absolute(item: str) -> str:
    key, _, value = item.partition("=")
    if key.strip() in PATH_KEYS and value and not value.startswith(("/", "$", "~")):
        return f"{key}={os.path.abspath(value)}"
    return item


def _paper_mid(name: str, config: str, model: str, description: str, shards: str = "data/shards16k",
               **layout) -> Recipe:
    return Recipe(name, description, config, model, sets=[
        f"checkpoint.load=checkpoints/{model}", "checkpoint.finetune=true", f"data.path={shards}",
        f"checkpoint.save=checkpoints/{name}", f"logging.tensorboard_dir=tensorboard/{name}"], **layout)


# The paper's mid-training (one 16K-token document a row, 32 a step, 4 steps a rollout round) at each size. Sizes
# past the paper's are our layouts; their checkpoints come from your own pretraining (checkpoint.load).
RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("pretrain_tiny_cpu", "2 gloo processes on a CPU: tiny DeltaNet NTP pretraining (what CI runs for real)",
           "tiny-deltanet", "deltanet_tiny", nodes=1, gpus_per_node=2,
           sets=["device=cpu", "data.path=data/builtin", "data.seq_length=64", "data.micro_batch_size=2",
                 "data.global_batch_size=4", "train_steps=4", "optimizer.warmup_steps=1",
                 "checkpoint.save=checkpoints/pretrain_tiny_cpu", "checkpoint.overwrite=true", "logging.log_interval=2"]),
    _paper_mid("midtrain_deltanet_1p3b", "refine-mid-deltanet-1p3b", "deltanet_1p3b",
               "the paper's REFINE mid-training of DeltaNet-1.3B: 1 node, TP 2 + SP, DP 4",
               tensor_model_parallel_size=2, sequence_parallel=True),
    _paper_mid("midtrain_gated_deltanet_1p3b", "refine-mid-gated-deltanet-1p3b", "gated_deltanet_1p3b",
               "REFINE mid-training of Gated DeltaNet-1.3B (fla's layout) under the paper's protocol: 1 node, TP 2 + SP, "
               "DP 4", tensor_model_parallel_size=2, sequence_parallel=True),
    _paper_mid("midtrain_lact_760m", "refine-mid-lact-760m", "lact_760m",
               "the paper's REFINE mid-training of LaCT-760M: 1 node, TP 2 + SP, DP 4",
               tensor_model_parallel_size=2, sequence_parallel=True),
    _paper_mid("midtrain_deltanet_2p7b", "refine-mid-deltanet-1p3b", "deltanet_2p7b",
               "REFINE mid-training of a 2.7B DeltaNet: 2 nodes, TP 4 + SP, DP 4",
               nodes=2, tensor_model_parallel_size=4, sequence_parallel=True),
    _paper_mid("midtrain_deltanet_7b", "refine-mid-deltanet-1p3b", "deltanet_7b",
               "REFINE mid-training of a 7B DeltaNet: 4 nodes, TP 4 + SP, DP 8",
               nodes=4, tensor_model_parallel_size=4, sequence_parallel=True),
    # Qwen3.5-4B's text model (a hybrid: three Gated DeltaNet layers to one gated-attention layer) from its converted
    # checkpoint. Its 4 key / value heads cap TP at 4; TP 2 + SP is 92 GiB, TP 4 + SP 49 GiB (docs/scaling.md: how
    # that grows with the document length).
    _paper_mid("midtrain_qwen3_5_4b", "refine-mid-qwen3-5-4b", "qwen3_5_4b",
               "REFINE mid-training of Qwen3.5-4B's text model (Gated DeltaNet + gated attention): 1 node, TP 4 + SP, "
               "DP 2", tensor_model_parallel_size=4, sequence_parallel=True, vocab_size=248320),
    # Long context: 64K-token documents. Gated DeltaNet's 6 heads cap TP at 2, so context parallelism carries the
    # length: TP 1 x CP 8 (45 GiB), the estimator's smallest TP x CP that fits (TP 2 + SP x CP 4 fits too, with
    # more traffic a layer); TP x CP 4 needs 76-80 GiB (docs/scaling.md, Long context).
    _paper_mid("midtrain_gated_deltanet_1p3b_64k", "refine-mid-gated-deltanet-1p3b-64k", "gated_deltanet_1p3b",
               "long-context REFINE mid-training of Gated DeltaNet-1.3B on 64K-token documents: 1 node, TP 1, CP 8, "
               "DP 1",
               shards="data/shards64k", context_parallel_size=8),
    _paper_mid("midtrain_lact_3b", "refine-mid-lact-760m", "lact_3b",
               "REFINE mid-training of LaCT-3B (the authors' 3B layout): 2 nodes, TP 4 + SP, DP 4 (tight)",
               nodes=2, tensor_model_parallel_size=4, sequence_parallel=True),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: python -m recipes --list shows {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["GPUS_PER_NODE", "RECIPES", "Recipe", "get_recipe"]
