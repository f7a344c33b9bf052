"""Fast-weight kernel benchmark: chunked vs token-by-token, and fla vs PyTorch, measured in one run as ratios.

    python benchmarks/kernels.py                                   # CUDA when available, else CPU; T in {1024, 4096}
    python benchmarks/kernels.py --device cpu --lengths 1024       # quicker
    python benchmarks/kernels.py --device cuda --cases fla --lengths 4096 16384 --heads 16 --head-dim 128
    python benchmarks/kernels.py --device cpu --lengths 1024 --json kernels.json   # the table as JSON too
    python benchmarks/kernels.py --device cpu --cases deltanet --lengths 2048 --gated  # Gated DeltaNet's rule

Cases (`--cases`, default all three):
- deltanet: `delta_rule(..., use_reference=True)` (chunked, PyTorch) vs `recurrent_delta_rule` (the decode step
  looped over T), forward and forward+backward, and the chunked path's forward+backward / forward ratio;
- lact: `lact_swiglu` (chunked) vs `lact_swiglu_step` looped over T, forward;
- fla (CUDA only): fla's Triton `chunk_delta_rule` vs the PyTorch chunked path on the same inputs, forward and
  forward+backward. `--heads 16 --head-dim 128` is a DeltaNet-1.3B layer.
`--gated`: the deltanet and fla cases run Gated DeltaNet's rule instead (`gated_delta_rule`,
`recurrent_gated_delta_rule`, fla's `chunk_gated_delta_rule`), with fp32 log decays g.
Inputs live on `--device`, in bf16 on CUDA (what the bf16 trainer feeds the kernels; fla's kernel takes only
half precision) and fp32 on CPU; every timing is bracketed by a CUDA synchronize on CUDA.
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_refine.kernels import (
    LaCTState,
    delta_rule,
    fla_available,
    gated_delta_rule,
    lact_swiglu,
    lact_swiglu_step,
    recurrent_delta_rule,
    recurrent_gated_delta_rule,
)

CASES = ("deltanet", "lact", "fla")


def timeit(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up (which also runs fla's autotuning)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deltanet_inputs(B, T, H, K, device, dtype, requires_grad, gated=False):
    """q, k, v, beta; with `gated` q, k, v, g, beta, the log decays g [B, T, H] in fp32 (as a GDN layer makes
    them), exp(g) about 0.95."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)  # [B, T, H, K]
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)  # [B, T, H]
    on = lambda x, dtype: x.to(device, dtype).requires_grad_(requires_grad)  # noqa: E731
    gates = [on(F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3), torch.float32)] if gated else []
    return [on(x, dtype) for x in (q, k, v)] + gates + [on(beta, dtype)]


def delta_rule_ops(gated: bool):
    """(name, chunked op, token-by-token op) of the rule the deltanet and fla cases run."""
    if gated:
        return "gated deltanet", gated_delta_rule, recurrent_gated_delta_rule
    return "deltanet", delta_rule, recurrent_delta_rule


def forward_backward(op, inputs):
    def run():
        o = op(*inputs)[0]
        o.float().sum().backward()
        for x in inputs:
            x.grad = None

    return run


def lact_inputs(B, T, H, D, device, dtype):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = (F.normalize(F.silu(rnd(B, T, H, D)), dim=-1) for _ in range(2))  # [B, T, H, D]
    v = F.silu(rnd(B, T, H, D))
    lrs = [F.softplus(rnd(B, T, H) - 6.0) for _ in range(3)]  # [B, T, H]
    momentum = torch.sigmoid(rnd(B, T, H))
    w = [rnd(H, D, D) / D**0.5 for _ in range(3)]  # [H, D, D]
    on = lambda xs: [x.to(device, dtype) for x in xs]  # noqa: E731
    return *on([q, k, v]), on(lrs), momentum.to(device, dtype), on(w)


def deltanet_rows(T, args, device, dtype):
    B, H, K, n = args.batch, args.heads, args.head_dim, args.repeats
    name, rule, recurrent = delta_rule_ops(args.gated)
    chunked = lambda *x: rule(*x, use_reference=True)  # noqa: E731
    fwd_in = deltanet_inputs(B, T, H, K, device, dtype, False, args.gated)
    with torch.no_grad():
        chunk_f = timeit(lambda: chunked(*fwd_in), n, device)
        rec_f = timeit(lambda: recurrent(*fwd_in), n, device)
    bwd_in = deltanet_inputs(B, T, H, K, device, dtype, True, args.gated)
    chunk_fb = timeit(forward_backward(chunked, bwd_in), n, device)
    rec_fb = timeit(forward_backward(recurrent, bwd_in), n, device)
    return [(f"{name} T={T} fwd", chunk_f, rec_f), (f"{name} T={T} fwd+bwd", chunk_fb, rec_fb)]


def lact_rows(T, args, device, dtype):
    B, H, D, C = args.batch, args.heads, args.head_dim, args.lact_chunk
    q, k, v, lrs, m, w = lact_inputs(B, T, H, D, device, dtype)

    def steps():
        state = LaCTState.initial(*w, B, C, use_momentum=True)
        for t in range(T):
            _, state = lact_swiglu_step(
                q[:, t], k[:, t], v[:, t], *(lr[:, t] for lr in lrs), state, momentum=m[:, t], use_muon=True
            )

    with torch.no_grad():
        chunked = timeit(lambda: lact_swiglu(q, k, v, *lrs, *w, chunk_size=C, momentum=m, use_muon=True),
                         args.repeats, device)
        looped = timeit(steps, max(1, args.repeats // 2), device)
    return [(f"lact T={T} C={C} fwd", chunked, looped)]


def fla_rows(T, args, device):
    B, H, K, n = args.batch, args.heads, args.head_dim, args.repeats
    name, rule, _ = delta_rule_ops(args.gated)
    chunked = lambda *x: rule(*x, use_reference=True)  # noqa: E731
    fwd_in = deltanet_inputs(B, T, H, K, device, torch.bfloat16, False, args.gated)
    with torch.no_grad():
        fla_f = timeit(lambda: rule(*fwd_in), n, device)  # dispatches to fla on CUDA bf16
        ref_f = timeit(lambda: chunked(*fwd_in), n, device)
    bwd_in = deltanet_inputs(B, T, H, K, device, torch.bfloat16, True, args.gated)
    fla_fb = timeit(forward_backward(rule, bwd_in), n, device)
    ref_fb = timeit(forward_backward(chunked, bwd_in), n, device)
    return [(f"{name} T={T} fwd: fla vs PyTorch", fla_f, ref_f),
            (f"{name} T={T} fwd+bwd: fla vs PyTorch", fla_fb, ref_fb)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lact-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gated", action="store_true",
                        help="the deltanet and fla cases run Gated DeltaNet's rule (gated_delta_rule) instead")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this host has no CUDA (or torch is a CPU build); use --device cpu")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = f"device {device}" + (f", GPU {gpu}" if gpu else "")
    print(f"{where}, dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, B={args.batch} H={args.heads} D={args.head_dim}")
    with_fla = "fla" in args.cases and fla_available(torch.empty(1, device=device, dtype=torch.bfloat16))
    if "fla" in args.cases and not with_fla:
        print("fla case skipped: fla's Triton kernel needs CUDA and an importable fla")

    rows = []
    for T in args.lengths:
        if "deltanet" in args.cases:
            rows += deltanet_rows(T, args, device, dtype)
        if "lact" in args.cases:
            rows += lact_rows(T, args, device, dtype)
        if with_fla:
            rows += fla_rows(T, args, device)

    print(f"{'case':<48} {'fast (ms)':>10} {'baseline (ms)':>14} {'speed-up':>9}")
    for name, fast, slow in rows:
        print(f"{name:<48} {fast * 1e3:>10.2f} {slow * 1e3:>14.2f} {slow / fast:>8.1f}x")
    print("fast = chunked (or fla); baseline = token-by-token recurrence (or the PyTorch chunked path)")
    # The PyTorch chunked delta rule's training cost over its forward (target <= 3: a matmul's backward is two).
    timed = {name: fast for name, fast, _ in rows}
    ratios = {}
    rule = delta_rule_ops(args.gated)[0]
    for T in args.lengths if "deltanet" in args.cases else ():
        ratios[T] = timed[f"{rule} T={T} fwd+bwd"] / timed[f"{rule} T={T} fwd"]
        print(f"chunked {rule} (PyTorch) T={T}: fwd+bwd / fwd = {ratios[T]:.2f}")
    if args.json:
        figures = dict(
            benchmark="kernels", device=str(device), gpu=gpu, dtype=str(dtype).removeprefix("torch."),
            torch=torch.__version__, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
            repeats=args.repeats, fla=with_fla, gated=args.gated,
            rows=[dict(case=name, fast_ms=fast * 1e3, baseline_ms=slow * 1e3, speedup=slow / fast)
                  for name, fast, slow in rows],
            chunked_fwd_bwd_over_fwd={str(T): r for T, r in ratios.items()},
        )
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
