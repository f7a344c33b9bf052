"""Fast-weight kernel benchmark: chunked vs token-by-token, measured in one run, printed as ratios.

    python benchmarks/kernels.py                 # CPU: T in {1024, 4096}
    python benchmarks/kernels.py --lengths 1024  # quicker

DeltaNet: `delta_rule` (chunked, PyTorch) vs `recurrent_delta_rule` (the decode step looped over T), forward
and forward+backward. LaCT: `lact_swiglu` (chunked) vs `lact_swiglu_step` looped over T, forward. On CUDA
also fla's Triton `chunk_delta_rule` (bf16) vs the PyTorch chunked path on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_refine.kernels import (
    LaCTState,
    delta_rule,
    fla_available,
    lact_swiglu,
    lact_swiglu_step,
    recurrent_delta_rule,
)


def timeit(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up."""
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deltanet_inputs(B, T, H, K, device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, K, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    return [x.to(device, dtype).requires_grad_(requires_grad) for x in (q, k, v, beta)]


def forward_backward(op, inputs):
    def run():
        o = op(*inputs)[0]
        o.float().sum().backward()
        for x in inputs:
            x.grad = None

    return run


def lact_inputs(B, T, H, D):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = (F.normalize(F.silu(rnd(B, T, H, D)), dim=-1) for _ in range(2))
    v = F.silu(rnd(B, T, H, D))
    lrs = [F.softplus(rnd(B, T, H) - 6.0) for _ in range(3)]
    momentum = torch.sigmoid(rnd(B, T, H))
    w = (rnd(H, D, D) / D**0.5, rnd(H, D, D) / D**0.5, rnd(H, D, D) / D**0.5)
    return q, k, v, lrs, momentum, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lact-chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, K = args.batch, args.heads, args.head_dim
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} H={H} D={K}")

    rows = []
    for T in args.lengths:
        fwd_in = deltanet_inputs(B, T, H, K, device, torch.float32, False)
        with torch.no_grad():
            chunk_f = timeit(lambda: delta_rule(*fwd_in, use_reference=True), args.repeats)
            rec_f = timeit(lambda: recurrent_delta_rule(*fwd_in), args.repeats)
        bwd_in = deltanet_inputs(B, T, H, K, device, torch.float32, True)
        chunk_fb = timeit(forward_backward(lambda *x: delta_rule(*x, use_reference=True), bwd_in), args.repeats)
        rec_fb = timeit(forward_backward(recurrent_delta_rule, bwd_in), args.repeats)
        rows += [
            (f"deltanet T={T} fwd", chunk_f, rec_f),
            (f"deltanet T={T} fwd+bwd", chunk_fb, rec_fb),
        ]

        q, k, v, lrs, m, w = lact_inputs(B, T, H, K)
        C = args.lact_chunk

        def lact_steps():
            state = LaCTState.initial(*w, B, C, use_momentum=True)
            for t in range(T):
                _, state = lact_swiglu_step(
                    q[:, t], k[:, t], v[:, t], *(lr[:, t] for lr in lrs), state, momentum=m[:, t], use_muon=True
                )

        with torch.no_grad():
            lact_f = timeit(lambda: lact_swiglu(q, k, v, *lrs, *w, chunk_size=C, momentum=m, use_muon=True), args.repeats)
            lact_rec = timeit(lact_steps, max(1, args.repeats // 2))
        rows.append((f"lact T={T} C={C} fwd", lact_f, lact_rec))

        if fla_available(torch.empty(1, device=device, dtype=torch.bfloat16)):
            half = deltanet_inputs(B, T, H, K, device, torch.bfloat16, True)
            fla_fb = timeit(forward_backward(delta_rule, half), args.repeats)
            ref_fb = timeit(forward_backward(lambda *x: delta_rule(*x, use_reference=True), half), args.repeats)
            rows.append((f"deltanet T={T} fwd+bwd bf16: fla vs reference", fla_fb, ref_fb))

    print(f"{'case':<48} {'fast (ms)':>10} {'baseline (ms)':>14} {'speed-up':>9}")
    for name, fast, slow in rows:
        print(f"{name:<48} {fast * 1e3:>10.2f} {slow * 1e3:>14.2f} {slow / fast:>8.1f}x")
    print("fast = chunked (or fla); baseline = token-by-token recurrence (or the PyTorch chunked path)")


if __name__ == "__main__":
    main()
