"""DeltaNet training throughput on one GPU: this project's Megatron model beside fla's own model, same shapes.

    python benchmarks/throughput.py --config deltanet_1p3b --seq-length 4096 --micro-batch-size 2 --steps 10
    python benchmarks/throughput.py --micro-batch-size 8 --recompute      # larger batches: recompute activations
    python benchmarks/throughput.py --level layer --micro-batch-size 8     # one layer's token mixer, both stacks
    python benchmarks/throughput.py ... --json throughput.json              # the table as JSON too

- megatron: `build_model` + megatron-core DDP + the distributed optimizer (Adam, fp32 main weights and gradient
  reduction, bf16 parameters), one training step per iteration through Megatron's forward-backward schedule,
  as the trainer runs it (TP = 1), on random tokens;
- fla: `fla.models.DeltaNetForCausalLM` from the DeltaNetConfig matching `--config`, bf16 parameters,
  torch's fused AdamW, gradient clipping at 1.0 like Megatron's default, the same batches.
`--recompute` recomputes every layer's activations in the backward (Megatron: full, uniform, 1 layer; fla:
gradient checkpointing). `--level layer` times one layer's token mixer instead, forward + backward of random
hidden states (gradients of the input and the weights, no optimizer): ours, `DeltaNetMixer` built from the layer
spec (fla's kernel inside on CUDA), beside `fla.layers.DeltaNet` built as fla's model builds it, same config.
Each stack runs in its own process, so one's memory never limits the other's; a stack that runs out of GPU
memory is reported as such and the other still runs.

Reported per stack: median step time over `--steps` steps after `--warmup`, tokens/s, peak memory and
MFU = 6 * N * tokens/s / peak bf16 FLOP/s, with N the parameters less the input embedding (a lookup, not a
matmul; the LM head is counted); the delta rule's own FLOPs (a few percent of 6N at 1.3B, under a tenth of a
lone mixer's) and the forward that `--recompute` repeats are not counted (model FLOPs, not hardware FLOPs).
The peak is the dense bf16 figure of the GPU, found from its name (H100 / H200 SXM: 989 TFLOP/s), or
`--peak-tflops`.
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import json
import statistics
import sys
import time

import torch

from megatron_refine.runtime import RankFailed, spawn

# Dense bf16 tensor-core peaks (NVIDIA data sheets), TFLOP/s; the first name contained in the device name wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def _timed_steps(step, batches: list[torch.Tensor], warmup: int, device: torch.device) -> list[float]:
    """Seconds of each step after `warmup` untimed ones (a CUDA synchronize on both sides of each)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)  # what training holds, not the set-up's transients
    times = []
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        step(batch)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _batches(args, vocab_size: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (args.micro_batch_size, args.seq_length + 1)  # [B, T + 1]: inputs and next-token labels
    return [torch.randint(0, vocab_size, shape, generator=g).to(device) for _ in range(args.warmup + args.steps)]


def _result(name: str, model: torch.nn.Module, embedding: int, times: list[float], device: torch.device,
            note: str) -> dict:
    """`embedding`: how many of the parameters are the input embedding (not counted in MFU)."""
    return dict(stack=name, step_s=statistics.median(times), note=note,
                params=sum(p.numel() for p in model.parameters()), embedding=embedding,
                peak_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


def megatron_throughput(args, device: str = "cuda") -> dict:
    """One process: the trainer's CUDA set-up (bf16 model, DDP, distributed optimizer). `device="cpu"` runs the
    same code on gloo, which checks it on a machine without a GPU."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_refine.models import PUBLISHED_VOCAB_SIZE, build_model, get_config
    from megatron_refine.models.specs import te_available
    from megatron_refine.runtime import initialize

    device = initialize(seed=0, device=device).device
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = get_config(args.config, params_dtype=torch.bfloat16, bf16=True,
                        use_cpu_initialization=device.type != "cuda", **(recompute if args.recompute else {}))
    module = build_model(config, PUBLISHED_VOCAB_SIZE).to(device)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), module)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, params_dtype=torch.bfloat16,
                        use_distributed_optimizer=True),
        [model],
    )
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        per_token = model(ids[:, :-1], None, None, labels=ids[:, 1:])  # [B, T]
        return per_token, lambda loss: (loss.float().mean(), {})

    def step(ids):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
                                    num_microbatches=1, seq_length=args.seq_length,
                                    micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()

    times = _timed_steps(step, _batches(args, PUBLISHED_VOCAB_SIZE, device), args.warmup, device)
    linears = "Transformer Engine" if te_available() else "megatron-core local"
    adam = type(optimizer.optimizer)  # torch's AdamW unless TE or Apex provides a fused Adam
    return _result("megatron", module, module.embedding.word_embeddings.weight.numel(), times, device,
                   f"{linears} linears, distributed optimizer over {adam.__module__.split('.')[0]} {adam.__name__}")


def fla_config(name: str):
    """fla's DeltaNetConfig with the fields of our preset (the layout is the same: architectures.md)."""
    from fla.models import DeltaNetConfig

    from megatron_refine.models import PUBLISHED_VOCAB_SIZE, get_config, get_mixer

    c = get_config(name)
    if [get_mixer(m).fla_layer for m in c.mixers] != ["DeltaNet"]:
        raise ValueError(f"--config {name} is a {c.mixer} model; fla's side of this benchmark is DeltaNet only")
    return DeltaNetConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_heads=c.num_attention_heads,
        expand_k=c.expand_k, expand_v=c.expand_v, use_gate=c.use_gate, use_short_conv=c.use_short_conv,
        conv_size=c.conv_size, use_beta=c.use_beta, use_output_norm=c.use_output_norm, qk_norm=c.qk_norm,
        qk_activation=c.qk_activation, allow_neg_eigval=c.allow_neg_eigval, intermediate_size=c.ffn_hidden_size,
        norm_eps=c.layernorm_epsilon, vocab_size=PUBLISHED_VOCAB_SIZE, tie_word_embeddings=c.tie_word_embeddings,
    )


def fla_throughput(args) -> dict:
    """One process: fla's model in bf16 with torch's AdamW."""
    from fla.models import DeltaNetForCausalLM

    device = torch.device("cuda")
    config = fla_config(args.config)
    torch.manual_seed(0)
    with device:  # initialised on the GPU: 1.3B parameters take minutes on the CPU
        model = DeltaNetForCausalLM(config).to(torch.bfloat16).train()
    if args.recompute:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(ids):
        tokens = ids[:, :-1]  # fla shifts the labels itself
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _timed_steps(step, _batches(args, config.vocab_size, device), args.warmup, device)
    return _result("fla", model, model.model.embeddings.weight.numel(), times, device, "bf16 parameters, fused AdamW")


def _hidden_states(args, hidden: int, device: torch.device, seq_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input and the gradient arriving at its output, the same values for both stacks."""
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(args.micro_batch_size, args.seq_length, hidden, generator=g) for _ in range(2))  # [B, T, h]
    x, dy = ((t.transpose(0, 1) if seq_first else t).to(device, torch.bfloat16) for t in (x, dy))
    return x.requires_grad_(), dy


def megatron_layer(args, device: str = "cuda") -> dict:
    """One process: the token mixer of one layer of `--config`, as the model's layer spec builds it. `device="cpu"`
    runs it on gloo (a check without a GPU)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_refine.models import get_config
    from megatron_refine.models.specs import get_layer_spec, te_available
    from megatron_refine.runtime import initialize

    device = initialize(seed=0, device=device).device
    config = get_config(args.config, params_dtype=torch.bfloat16, bf16=True, num_layers=1,
                        use_cpu_initialization=device.type != "cuda")
    if len(config.mixers) > 1:
        raise ValueError(f"--config {args.config} is a hybrid ({config.hybrid_layer_pattern}): this benchmark times one "
                         "mixer's layer; pass a preset of one mixer")
    spec = get_layer_spec(config.mixer).submodules.self_attention
    mixer = build_module(spec, config=config, layer_number=1).to(device)
    x, dy = _hidden_states(args, config.hidden_size, device, seq_first=True)  # [T, B, h]

    def step(_):
        out, _ = mixer(x)
        out.backward(dy)
        x.grad = None
        mixer.zero_grad(set_to_none=True)

    times = _timed_steps(step, [None] * (args.warmup + args.steps), args.warmup, device)
    linears = "Transformer Engine" if te_available() else "megatron-core local"
    return _result("megatron", mixer, 0, times, device, f"{type(mixer).__name__}, {linears} linears")


def fla_layer(args, device: str = "cuda") -> dict:
    """One process: fla's DeltaNet layer, with the arguments fla's model gives it."""
    from fla.layers import DeltaNet

    device = torch.device(device)
    c = fla_config(args.config)
    torch.manual_seed(0)
    with device:
        layer = DeltaNet(
            mode=c.attn_mode, hidden_size=c.hidden_size, expand_k=c.expand_k, expand_v=c.expand_v,
            num_heads=c.num_heads, use_gate=c.use_gate, use_beta=c.use_beta, use_short_conv=c.use_short_conv,
            allow_neg_eigval=c.allow_neg_eigval, use_output_norm=c.use_output_norm, conv_size=c.conv_size,
            qk_norm=c.qk_norm, qk_activation=c.qk_activation, norm_eps=c.norm_eps, layer_idx=0,
        ).to(torch.bfloat16).train()
    x, dy = _hidden_states(args, c.hidden_size, device, seq_first=False)  # [B, T, h]

    def step(_):
        out, _, _ = layer(x)
        out.backward(dy)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    times = _timed_steps(step, [None] * (args.warmup + args.steps), args.warmup, device)
    return _result("fla", layer, 0, times, device, "fla.layers.DeltaNet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="deltanet_1p3b", help="a DeltaNet preset of megatron_refine.models")
    parser.add_argument("--level", choices=["model", "layer"], default="model",
                        help="a training step of the whole model, or forward + backward of one layer's mixer")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning, allocator)")
    parser.add_argument("--recompute", action="store_true", help="full activation recomputation")
    parser.add_argument("--stacks", nargs="+", choices=["megatron", "fla"], default=["megatron", "fla"])
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU (default: from its name)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/throughput.py needs a CUDA GPU (this host has none, or torch is a CPU build); "
                 "on CPU use benchmarks/refine_cost.py or `megatron-refine demo`")

    runs = {"model": dict(megatron=megatron_throughput, fla=fla_throughput),
            "layer": dict(megatron=megatron_layer, fla=fla_layer)}[args.level]
    results, out_of_memory = [], []
    for stack in args.stacks:
        run = runs[stack]
        try:
            results.append(spawn(run, 1, args, timeout=3600)[0])
        except RankFailed as e:
            if "OutOfMemoryError" not in str(e):
                raise
            print(f"{stack}: out of GPU memory at micro-batch {args.micro_batch_size}, seq {args.seq_length}: "
                  "use --recompute or a smaller --micro-batch-size")
            out_of_memory.append(stack)
    if not results:
        sys.exit(1)
    name = results[0]["device"]
    peak = args.peak_tflops or peak_tflops(name)
    tokens = args.micro_batch_size * args.seq_length
    peak_text = f"{peak:.0f} TFLOP/s" if peak else "unknown (--peak-tflops)"
    what = args.config if args.level == "model" else f"one token mixer of {args.config} (forward + backward)"
    print(f"{name}, torch {torch.__version__}, {what}, seq {args.seq_length}, micro-batch "
          f"{args.micro_batch_size}, bf16, TP 1, recompute {'full' if args.recompute else 'none'}, median of "
          f"{args.steps} steps after {args.warmup}; bf16 peak {peak_text}")
    print(f"{'stack':<9} {'params':>14} {'step (ms)':>10} {'tokens/s':>10} {'MFU':>6} {'peak mem (GiB)':>15}  notes")
    for r in results:
        r["tokens_per_s"] = tokens / r["step_s"]
        r["mfu"] = 6 * (r["params"] - r["embedding"]) * r["tokens_per_s"] / (peak * 1e12) if peak else None
        mfu = f"{r['mfu']:.1%}" if peak else "n/a"
        print(f"{r['stack']:<9} {r['params']:>14,} {r['step_s'] * 1e3:>10.1f} {r['tokens_per_s']:>10,.0f} {mfu:>6} "
              f"{r['peak_memory'] / 2**30:>15.1f}  {r['note']}")
    if len({r["params"] for r in results}) > 1:
        print("the parameter counts differ: the two models are not the same architecture (see fla_config)")
    if args.json:
        figures = dict(
            benchmark="throughput", level=args.level, config=args.config, gpu=name, torch=torch.__version__,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, recompute=args.recompute,
            warmup=args.warmup, steps=args.steps, peak_tflops=peak, results=results, out_of_memory=out_of_memory,
        )
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
