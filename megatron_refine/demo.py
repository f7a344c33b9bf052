"""`megatron-refine demo`: the README's main job.

Until the training stack lands (issue 5) this is the foundation's end-to-end check: a tiny megatron-core
language model (vocab-parallel embedding, SwiGLU MLP blocks, vocab-parallel LM head) trained with
tensor + sequence parallelism on local ranks (2 gloo processes on a CPU), with Megatron's DDP and
optimizer, saved as a dist checkpoint, and reloaded at TP=1 to show that the evaluation loss carries over.
The task is synthetic next-token prediction: token t+1 = perm[token t] (a fixed random permutation), replaced
by a uniform random token 10% of the time, so it is learnable without attention and the best loss is known.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_refine.runtime import initialize, spawn


@dataclass
class DemoConfig:
    tp: int = 2
    nproc: int = 2
    steps: int = 60
    vocab_size: int = 64
    hidden_size: int = 64
    num_layers: int = 2
    seq_length: int = 32
    global_batch_size: int = 8
    lr: float = 1e-2
    seed: int = 1234
    out_dir: str = "demo_output"


class TinyMLPLM(MegatronModule):
    """Embedding -> N residual SwiGLU MLP blocks -> LM head, all megatron-core tensor-parallel layers."""

    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__(config)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            vocab_size, config.hidden_size, init_method=config.init_method, config=config
        )
        submodules = MLPSubmodules(
            linear_fc1=tensor_parallel.ColumnParallelLinear,
            linear_fc2=tensor_parallel.RowParallelLinear,
        )
        self.blocks = torch.nn.ModuleList(
            MLP(config, submodules, ffn_hidden_size=config.ffn_hidden_size)
            for _ in range(config.num_layers)
        )
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False,
        )

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [s/tp, b, h]
        for block in self.blocks:
            x = x + block(x)[0]
        logits, _ = self.output_layer(x)  # [s, b, V/tp]; the layer gathers the sequence under SP
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous())  # [s, b]
        return loss.mean()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # Each block names its own TP-sharded pieces (a bare ModuleList would be saved as replicated).
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = {}
        for name, module in [("embedding", self.embedding), ("output_layer", self.output_layer)] + [
            (f"blocks.{i}", block) for i, block in enumerate(self.blocks)
        ]:
            state.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return state


NOISE = 0.1


def _batch(cfg: DemoConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of the permutation task; every rank builds the same one."""
    perm = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(cfg.seed))
    g = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    shape = (cfg.global_batch_size, cfg.seq_length + 1)
    noise = torch.randint(0, cfg.vocab_size, shape, generator=g)
    replaced = torch.rand(shape, generator=g) < NOISE
    seq = [noise[:, 0]]
    for t in range(1, shape[1]):
        seq.append(torch.where(replaced[:, t], noise[:, t], perm[seq[-1]]))
    seq = torch.stack(seq, dim=1)  # [B, s+1]
    return seq[:, :-1], seq[:, 1:]


def best_loss(vocab_size: int) -> float:
    """Entropy of the next token given the current one: the loss a perfect model reaches."""
    p_hit = 1 - NOISE + NOISE / vocab_size
    p_miss = NOISE / vocab_size
    return -(p_hit * math.log(p_hit) + (vocab_size - 1) * p_miss * math.log(p_miss))


def _model_config(cfg: DemoConfig, tp: int) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=4 * cfg.hidden_size,
        num_attention_heads=tp,  # unused (no attention), but TransformerConfig checks it divides by TP
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=torch.float32,
    )


def _local(x: torch.Tensor) -> torch.Tensor:
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    n = x.shape[0] // dp
    return x[rank * n : (rank + 1) * n]


def _eval_loss(model: TinyMLPLM, cfg: DemoConfig, device: torch.device) -> float:
    tokens, labels = _batch(cfg, step=-1)  # held out: never a training step
    with torch.no_grad():
        loss = model(_local(tokens).to(device), _local(labels).to(device)).detach()
    torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return loss.item() / parallel_state.get_data_parallel_world_size()


def _train(cfg: DemoConfig) -> dict:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    rt = initialize(tp=cfg.tp, seed=cfg.seed)
    config = _model_config(cfg, cfg.tp)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), TinyMLPLM(config, cfg.vocab_size).to(rt.device)
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=0.01, clip_grad=1.0), [model]
    )
    losses, start = [], time.perf_counter()
    for step in range(cfg.steps):
        tokens, labels = _batch(cfg, step)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(_local(tokens).to(rt.device), _local(labels).to(rt.device))
        loss.backward()
        model.finish_grad_sync()
        optimizer.step()
        losses.append(loss.item())
        if rt.is_main and (step % 10 == 0 or step == cfg.steps - 1):
            print(f"  step {step:4d} | loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start
    eval_loss = _eval_loss(model.module, cfg, rt.device)
    ckpt = Path(cfg.out_dir, "checkpoint")
    if rt.is_main:  # a fresh directory each run (atomic, resumable checkpoints come with the trainer)
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.module.sharded_state_dict(), str(ckpt))
    return {"losses": losses, "eval_loss": eval_loss, "seconds": seconds, "checkpoint": str(ckpt),
            "world": rt.world_size, "dp": rt.layout.data_parallel_size}


def _reload_tp1(cfg: DemoConfig, checkpoint: str) -> float:
    rt = initialize(tp=1, seed=cfg.seed + 1)
    model = TinyMLPLM(_model_config(cfg, 1), cfg.vocab_size).to(rt.device)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), checkpoint))
    return _eval_loss(model, cfg, rt.device)


def run(cfg: DemoConfig) -> dict:
    print(
        f"megatron-refine demo (foundation): tiny Megatron LM, TP={cfg.tp} + sequence parallel on "
        f"{cfg.nproc} {'NCCL' if torch.cuda.is_available() else 'gloo'} ranks, {cfg.steps} steps",
        flush=True,
    )
    result = spawn(_train, cfg.nproc, cfg, timeout=1800)[0]
    reloaded = spawn(_reload_tp1, 1, cfg, result["checkpoint"], timeout=600)[0]
    first, last = result["losses"][0], result["losses"][-1]
    rows = [
        ("layout", f"world {result['world']} = TP {cfg.tp} x DP {result['dp']}, SP on"),
        ("loss (step 0 -> last)", f"{first:.4f} -> {last:.4f}  (uniform guess {math.log(cfg.vocab_size):.4f}, best {best_loss(cfg.vocab_size):.4f})"),
        ("held-out loss at TP=%d" % cfg.tp, f"{result['eval_loss']:.4f}"),
        ("held-out loss, reloaded at TP=1", f"{reloaded:.4f}"),
        ("train time", f"{result['seconds']:.1f}s ({cfg.steps / result['seconds']:.1f} steps/s)"),
        ("dist checkpoint", result["checkpoint"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}} | {v}" for k, v in rows))
    if not last < 0.5 * first:
        raise RuntimeError(f"demo training did not learn: loss {first:.4f} -> {last:.4f}")
    if abs(reloaded - result["eval_loss"]) > 1e-4:
        raise RuntimeError(
            f"TP=1 reload gives loss {reloaded:.6f}, TP={cfg.tp} gave {result['eval_loss']:.6f}"
        )
    print("demo OK", flush=True)
    return {**result, "reloaded_eval_loss": reloaded}
