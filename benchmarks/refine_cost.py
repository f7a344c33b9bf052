"""What a REFINE step costs, measured in one run on a small model (CUDA when available, else CPU).

    python benchmarks/refine_cost.py                      # T in {256, 512, 1024}
    python benchmarks/refine_cost.py --lengths 512 --mixer lact
    python benchmarks/refine_cost.py --lengths 512 2048 --mixer gated_deltanet
    python benchmarks/refine_cost.py --lengths 512 2048 --mixer hybrid    # Gated DeltaNet + attention layers
    python benchmarks/refine_cost.py --device cuda --lengths 4096 16384 --hidden 1024 --layers 8 --heads 8
    python benchmarks/refine_cost.py --lengths 256 --json refine_cost.json   # the tables as JSON too

For each sequence length, on the same batch (forward + backward, no optimizer step):
- NTP step: the plain next-token loss;
- REFINE step (ours): ONE forward over the documents, whose detached logits choose the positions and whose
  chunk states give the states after them, k - 1 no-grad decode steps to sample the rollouts, one training
  forward over the k rollout tokens from the branch states to score them (and check parity with the
  decoder), GRPO + NTP loss, one backward; its split (forward / select / rollout / score / backward, the
  step's own `time_*` metrics plus the timed backward) is printed per length;
- re-encode baseline (the released method's cost model): the same selection and NTP loss, then for every
  selected position a no-grad prefill of its prefix to sample the rollout and a separate forward + backward
  over prefix + rollout for the policy loss: n_chunks extra full passes per document.
- packed: the NTP and REFINE steps again with `--documents` documents per row and the state reset at each
  (`packed_seq_params`, the trainer's default), to show what document boundaries cost.
The last line is `refine/ntp step time ratio: X.XX` at the longest length (packed documents).
The model trains as the trainer would on that device: bf16 on CUDA (fla's kernels for DeltaNet), fp32 on CPU;
timings are bracketed by a CUDA synchronize on CUDA.
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import json
import statistics
import time

import torch

from megatron_refine.models.mixers import MIXERS
from megatron_refine.runtime import spawn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, dict[str, float]]]:
    """Median seconds of each function over `repeats` rounds after a warm-up round, and the median of each phase
    it reports. The functions take turns within a round, so a slow spell of the machine hits them alike."""
    for fn in fns.values():
        fn()
    times, phases = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            phases[name].append(fn() or {})
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]),
                   {phase: statistics.median(p[phase] for p in phases[name]) for phase in phases[name][0]})
            for name in fns}


def _bench(args) -> tuple[str, list[tuple]]:
    from megatron_refine.models import PRESETS, build_model, get_config, packed_seq_params
    from megatron_refine.models.generation import sample_tokens
    from megatron_refine.refine import STEP_PHASES, RefineConfig, refine_loss, select
    from megatron_refine.refine.grpo import grpo_advantages
    from megatron_refine.models.losses import vocab_parallel_log_probs
    from megatron_refine.runtime import initialize

    device = initialize(seed=0, device=args.device).device
    cuda = device.type == "cuda"
    dtype = dict(params_dtype=torch.bfloat16, bf16=True) if cuda else dict(params_dtype=torch.float32)
    # The mixer's tiny preset at the benchmark's size; Gated DeltaNet's heads (megatron-core's linear_* fields,
    # which the other mixers ignore) as DeltaNet's: `heads` key and value heads of hidden / heads channels.
    heads = dict(linear_num_key_heads=args.heads, linear_num_value_heads=args.heads,
                 linear_key_head_dim=args.hidden // args.heads, linear_value_head_dim=args.hidden // args.heads)
    # A hybrid: its preset's pattern repeated to `layers`, its attention layers with half as many key / value heads as
    # query heads (hidden / heads channels each), as Qwen3.5's grouped heads.
    pattern = PRESETS[f"{args.mixer}_tiny"].get("hybrid_layer_pattern")
    hybrid = dict(hybrid_layer_pattern=(pattern * args.layers)[: args.layers], num_query_groups=max(args.heads // 2, 1),
                  kv_channels=args.hidden // args.heads) if pattern else {}
    config = get_config(f"{args.mixer}_tiny", use_cpu_initialization=not cuda, hidden_size=args.hidden,
                        num_layers=args.layers, num_attention_heads=args.heads, ffn_hidden_size=3 * args.hidden,
                        delta_rule_chunk_size=64, **heads, **hybrid, **dtype)
    model = build_model(config, 257).to(device)
    cfg = RefineConfig()
    rows = []
    for T in args.lengths:
        g = torch.Generator().manual_seed(T)  # the data: the same on every device
        sampler = torch.Generator(device).manual_seed(T)  # draws from probabilities on the model's device
        ids = torch.randint(0, 257, (args.batch, T + 1), generator=g).to(device)
        tokens, labels = ids[:, :-1], ids[:, 1:]
        # Documents of random lengths (at least 2 * margin + 1 tokens), the same for every row.
        cuts = sorted(torch.randperm(T // 64 - 1, generator=g)[: args.documents - 1].add(1).mul(64).tolist())
        starts = [b * T + c for b in range(args.batch) for c in [0, *cuts]] + [args.batch * T]
        packed = packed_seq_params(torch.tensor(starts, device=device))

        def ntp(params=None):
            model(tokens, None, None, labels=labels, packed_seq_params=params).mean().backward()
            model.zero_grad(set_to_none=True)

        def refine(params=None) -> dict[str, float]:
            loss, metrics = refine_loss(model, tokens, labels, cfg, torch.Generator(device).manual_seed(1),
                                        packed_seq_params=params)
            _sync(device)
            start = time.perf_counter()
            loss.backward()
            _sync(device)
            backward = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            return {**{phase: metrics[f"time_{phase}"].item() for phase in STEP_PHASES}, "backward": backward}

        def reencode():
            with torch.no_grad():  # the release's selection pass
                positions, _, _ = select(model(tokens, None, None), cfg, torch.Generator(device).manual_seed(1))
            loss = model(tokens, None, None, labels=labels).mean()  # the NTP part
            rollouts, prefixes = [], []
            with torch.no_grad():  # sample each rollout after prefilling its own prefix
                for b in range(args.batch):
                    for p in positions[b].tolist():
                        prefix = tokens[b : b + 1, : p + 1]
                        out = model.forward_with_branch_states(prefix)
                        cache = out.states_after(torch.tensor([[p]], device=device))
                        logits, rollout = out.logits[:, -1], []
                        for _ in range(cfg.k):
                            rollout.append(sample_tokens(logits, generator=sampler))
                            logits, _ = model.step(rollout[-1], cache)
                        rollouts.append(torch.cat(rollout))
                        prefixes.append(prefix[0])
            # Scoring is not what differs.
            rewards = torch.rand(args.batch, cfg.n_chunks, generator=sampler, device=device)
            advantages = grpo_advantages(rewards).flatten()
            for prefix, rollout, a in zip(prefixes, rollouts, advantages):  # a full pass per rollout
                seq = torch.cat([prefix, rollout[:-1]])[None]
                logp = vocab_parallel_log_probs(model(seq, None, None)[0, len(prefix) - 1 :], rollout)
                loss = loss + cfg.ppo_coef * (-a * logp).sum() / (len(rollouts) * cfg.k)
            loss.backward()
            model.zero_grad(set_to_none=True)

        timed = _time({"ntp": ntp, "refine": refine, "ntp_packed": lambda: ntp(packed),
                       "refine_packed": lambda: refine(packed), "reencode": reencode}, args.repeats, device)
        rows.append((T, *(timed[name][0] for name in ("ntp", "refine", "reencode", "ntp_packed", "refine_packed")),
                     timed["refine"][1], timed["refine_packed"][1]))
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if cuda else ""
    pattern = f", layers {config.hybrid_layer_pattern}" if config.hybrid_layer_pattern else ""
    return f"device {device}{gpu}, dtype {str(config.params_dtype).removeprefix('torch.')}{pattern}", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--mixer", default="deltanet", choices=[*MIXERS, "hybrid"],
                        help="a mixer of the table (its tiny preset), or hybrid (hybrid_tiny's Gated DeltaNet and "
                        "attention layers)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--documents", type=int, default=4, help="documents per row in the packed runs")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this host has no CUDA (or torch is a CPU build); use --device cpu")
    header, rows = spawn(_bench, 1, args, timeout=3600)[0]
    print(f"{header}, {args.mixer}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"batch {args.batch}, n_chunks 8, k 5, threads {torch.get_num_threads()}")
    print(f"{'T':>6} {'NTP (ms)':>10} {'REFINE (ms)':>12} {'re-encode (ms)':>15} {'refine/ntp':>11} "
          f"{'re-encode/refine':>17} | {'packed NTP':>11} {'packed REFINE':>14} {'refine/ntp':>11}")
    for T, ntp, refine, reencode, ntp_p, refine_p, _, _ in rows:
        print(f"{T:>6} {ntp * 1e3:>10.1f} {refine * 1e3:>12.1f} {reencode * 1e3:>15.1f} {refine / ntp:>11.2f} "
              f"{reencode / refine:>17.2f} | {ntp_p * 1e3:>11.1f} {refine_p * 1e3:>14.1f} {refine_p / ntp_p:>11.2f}")
    phases = list(rows[0][6])
    cuda_note = "; on CUDA only the backward is synchronized, the rest is launch time" if args.device == "cuda" else ""
    print(f"REFINE step split (ms, median per phase{cuda_note}):")
    print(f"{'T':>6} {'':>8} " + " ".join(f"{name:>9}" for name in phases))
    for T, *_, split, split_packed in rows:
        for label, parts in (("", split), ("packed", split_packed)):
            print(f"{T:>6} {label:>8} " + " ".join(f"{parts[name] * 1e3:>9.1f}" for name in phases))
    print(f"refine/ntp step time ratio: {rows[-1][5] / rows[-1][4]:.2f}")
    if args.json:
        ms = lambda t: t * 1e3  # noqa: E731
        figures = dict(
            benchmark="refine_cost", header=header, torch=torch.__version__, mixer=args.mixer, hidden=args.hidden,
            layers=args.layers, heads=args.heads, batch=args.batch, repeats=args.repeats, documents=args.documents,
            rows=[dict(T=T, ntp_ms=ms(ntp), refine_ms=ms(refine), reencode_ms=ms(reencode),
                       refine_over_ntp=refine / ntp, reencode_over_refine=reencode / refine,
                       packed_ntp_ms=ms(ntp_p), packed_refine_ms=ms(refine_p), packed_refine_over_ntp=refine_p / ntp_p,
                       split_ms={k: ms(v) for k, v in split.items()},
                       packed_split_ms={k: ms(v) for k, v in split_packed.items()})
                  for T, ntp, refine, reencode, ntp_p, refine_p, split, split_packed in rows],
            packed_refine_over_ntp_at_longest=rows[-1][5] / rows[-1][4],
        )
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
