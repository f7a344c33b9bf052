"""Context parallelism (issue 31) measured on a small model: activation memory per rank, communication per layer,
and bf16 drift against one rank. CPU, gloo ranks (`spawn`), our PyTorch chunked kernels (not fla's Triton ones).

    python benchmarks/context_parallel.py                                  # all three parts, every mixer
    python benchmarks/context_parallel.py --parts memory --length 8192 --cp 1 2 4
    python benchmarks/context_parallel.py --parts drift --mixers gated_deltanet --drift-length 32768
    python benchmarks/context_parallel.py --parts memory --json context_parallel.json   # the tables as JSON too

Models: the mixer's tiny preset at hidden `--hidden`, `--layers` layers, `--heads` heads (sized as
benchmarks/refine_cost.py's: Gated DeltaNet's key and value heads as DeltaNet's heads; the hybrid `hybrid_tiny`'s
pattern G*G* repeated, attention with half as many key / value heads as query heads). One row of tokens; rank r
holds tokens [r T / c, (r + 1) T / c) (models/context_parallel.py).

- memory: one training forward (per-token NTP loss, then its backward) at each CP size c; the bytes of the tensors
  autograd saves for the backward, counted with saved-tensor hooks, each storage once, parameters left out, split by
  where they were saved (the delta-rule layers' mixers, the attention layers' mixers, the rest: embedding, norms, MLPs,
  logits and loss). The largest rank's figures, and its total over c = 1's.
- comm: in the same forward, the bytes each rank's all-gathers deliver (`torch.distributed.all_gather` and
  megatron-core's gather, every rank's piece, its own included) per layer, by what they carry: a delta-rule layer's
  fp32 transitions [P | N] of every piece (beside `kernels.context_parallel_bytes`) and its short convolutions' last
  W - 1 inputs (beside the estimator's `context_parallel_halo_bytes`, in bf16), an attention layer's keys and values
  (beside the estimator's, `context_parallel_comm_bytes`, which counts the other c - 1 pieces only, in bf16). The
  backward reduces as much again (not counted).
- drift: one no-grad forward over one row of `--drift-length` tokens in bf16 (the same weights at every c: the fp32
  model's, cast) at each CP size, against the same forward at c = 1 in fp32 (at c = 1: bf16's own error, the scale)
  and in bf16: max and mean absolute difference of the logits and of the log-probabilities of the true next tokens
  over every position, and the mean of the latter over the row's last quarter (does it grow along the row?).
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse
import json
from collections import Counter
from contextlib import contextmanager

import torch

from megatron_refine.runtime import spawn

VOCAB = 257
MIXERS = ("deltanet", "gated_deltanet", "hybrid")
PARTS = ("memory", "comm", "drift")


def _config(args, mixer: str, cp: int, **overrides):
    from megatron_refine.models import PRESETS, get_config

    heads = dict(linear_num_key_heads=args.heads, linear_num_value_heads=args.heads,
                 linear_key_head_dim=args.hidden // args.heads, linear_value_head_dim=args.hidden // args.heads)
    pattern = PRESETS[f"{mixer}_tiny"].get("hybrid_layer_pattern")
    hybrid = dict(hybrid_layer_pattern=(pattern * args.layers)[: args.layers], num_query_groups=max(args.heads // 2, 1),
                  kv_channels=args.hidden // args.heads) if pattern else {}
    return get_config(f"{mixer}_tiny", use_cpu_initialization=True, hidden_size=args.hidden, num_layers=args.layers,
                      num_attention_heads=args.heads, ffn_hidden_size=3 * args.hidden, delta_rule_chunk_size=64,
                      context_parallel_size=cp, **heads, **hybrid, **overrides)


def _piece(x: torch.Tensor) -> torch.Tensor:
    """This rank's piece of rows x [B, T, ...]."""
    from megatron.core import parallel_state

    c, r = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    L = x.shape[1] // c
    return x[:, r * L:(r + 1) * L]


def _tokens(T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(T))  # [1, T + 1]


@contextmanager
def _mixer_tags(model):
    """{"where": the kind of the mixer running now (its name), or "rest" outside every mixer}."""
    now = {"where": "rest"}
    handles = []
    for name, mixer in zip(model.config.layer_mixers, model.mixers):
        handles.append(mixer.register_forward_pre_hook(lambda m, a, name=name: now.update(where=name)))
        handles.append(mixer.register_forward_hook(lambda m, a, o: now.update(where="rest")))
    try:
        yield now
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _counted_gathers(now: dict):
    """Counter {(mixer, what it carries): bytes} of the all-gathers run inside the block: what each delivers to this
    rank, every rank's piece (its own included)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megatron_refine.models import context_parallel

    received, carrying = Counter(), {"what": None}
    all_gather, gather_into = dist.all_gather, mappings.dist_all_gather_func
    previous_tail = context_parallel._all_gather

    def counted_all_gather(parts, x, *args, **kwargs):  # the delta rule's transitions, and the conv windows'
        received[now["where"], carrying["what"] or "transitions [P | N]"] += sum(p.nbytes for p in parts)
        return all_gather(parts, x, *args, **kwargs)

    def counted_gather_into(out, x, *args, **kwargs):  # megatron-core's sequence gather: attention's keys, values
        received[now["where"], "keys, values"] += out.nbytes
        return gather_into(out, x, *args, **kwargs)

    def conv_window(x, group):
        carrying["what"] = "conv windows"
        try:
            return previous_tail(x, group)
        finally:
            carrying["what"] = None

    dist.all_gather, mappings.dist_all_gather_func, context_parallel._all_gather = (
        counted_all_gather, counted_gather_into, conv_window)
    try:
        yield received
    finally:
        dist.all_gather, mappings.dist_all_gather_func, context_parallel._all_gather = (
            all_gather, gather_into, previous_tail)


def _memory_and_comm(args, mixer: str, cp: int) -> tuple[Counter, Counter]:
    """One training forward (and its backward) of this rank's piece -> (saved bytes by where they were saved,
    gathered bytes by (mixer, what))."""
    from megatron_refine.models import build_model
    from megatron_refine.runtime import initialize

    initialize(cp=cp, seed=0, device="cpu")
    model = build_model(_config(args, mixer, cp), VOCAB)
    ids = _tokens(args.length)
    tokens, labels = _piece(ids[:, :-1]), _piece(ids[:, 1:])
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, seen = Counter(), set()

    with _mixer_tags(model) as now:
        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                saved[now["where"]] += storage.nbytes()
            return t

        with _counted_gathers(now) as received, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = model(tokens, None, None, labels=labels)  # [1, T / c] per-token loss
    loss.sum().backward()
    return saved, received


def _drift_forward(args, mixer: str, cp: int, bf16: bool, state: dict | None):
    """A no-grad forward of this rank's piece of one row of `--drift-length` tokens -> (logits [L, V] fp32,
    log-probs of the next tokens [L], the weights: `state` loaded, or these, the seed's)."""
    from megatron_refine.models import build_model
    from megatron_refine.models.losses import vocab_parallel_log_probs
    from megatron_refine.runtime import initialize

    initialize(cp=cp, seed=0, device="cpu")
    dtype = dict(params_dtype=torch.bfloat16, bf16=True) if bf16 else {}
    model = build_model(_config(args, mixer, cp, **dtype), VOCAB)
    if state is not None:
        model.load_state_dict(state)
    ids = _tokens(args.drift_length)
    tokens, labels = _piece(ids[:, :-1]), _piece(ids[:, 1:])
    with torch.no_grad():
        logits = model(tokens, None, None)  # [1, L, V]
        log_probs = vocab_parallel_log_probs(logits, labels)  # [1, L]
    # the padded vocabulary's logits are -inf: left out
    return logits[0, :, :VOCAB].float(), log_probs[0], state if state is not None else model.state_dict()


def _drift(args, mixer: str) -> list[tuple]:
    """Rows (c, against, max |d logits|, mean |d logits|, max |d log-probs|, mean |d log-probs|, mean |d log-probs|
    over the row's last quarter)."""
    fp32_logits, fp32_log_probs, state = spawn(_drift_forward, 1, args, mixer, 1, False, None, timeout=3600)[0]
    runs = {}
    for c in args.cp:
        pieces = spawn(_drift_forward, c, args, mixer, c, True, state, timeout=3600)
        runs[c] = tuple(torch.cat([piece[i] for piece in pieces]) for i in range(2))  # the whole row's
    rows = []
    for c, (logits, log_probs) in runs.items():
        against = [("fp32 c=1", fp32_logits, fp32_log_probs)] + ([("bf16 c=1", *runs[1])] if c > 1 else [])
        for name, ref_logits, ref_log_probs in against:
            d_logits, d_log_probs = (logits - ref_logits).abs(), (log_probs - ref_log_probs).abs()
            rows.append((c, name, d_logits.max().item(), d_logits.mean().item(), d_log_probs.max().item(),
                         d_log_probs.mean().item(), d_log_probs[-len(d_log_probs) // 4:].mean().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS),
                        help="a mixer's tiny preset, or hybrid (hybrid_tiny's Gated DeltaNet and attention layers)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4], help="context-parallel sizes (ranks)")
    parser.add_argument("--length", type=int, default=8192, help="tokens of the row in the memory and comm parts")
    parser.add_argument("--drift-length", type=int, default=32768, help="tokens of the row in the drift part")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if 1 not in args.cp:
        parser.error("--cp must include 1: every figure is compared with one rank's")
    args.cp = sorted(set(args.cp))
    for c in args.cp:
        if args.length % (64 * c) or args.drift_length % (64 * c):
            parser.error(f"--length and --drift-length must split into {c} pieces of whole 64-token chunks")
    from megatron_refine.kernels import context_parallel_bytes
    from megatron_refine.training.estimate import Layout, context_parallel_comm_bytes, context_parallel_halo_bytes

    print(f"CPU, gloo ranks, PyTorch chunked kernels (chunk 64), hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, vocab {VOCAB}, one row, threads {torch.get_num_threads()}")
    figures = dict(benchmark="context_parallel", torch=torch.__version__, hidden=args.hidden, layers=args.layers,
                   heads=args.heads, length=args.length, drift_length=args.drift_length, memory=[], comm=[], drift=[])
    if {"memory", "comm"} & set(args.parts):
        runs = {(mixer, c): spawn(_memory_and_comm, c, args, mixer, c, timeout=3600)
                for mixer in args.mixers for c in args.cp}
    if "memory" in args.parts:
        mib = 2.0 ** 20
        print(f"\nactivation memory per rank, T {args.length}, fp32: bytes saved for the backward (MiB), the largest "
              "rank's")
        print(f"{'mixer':>15} {'c':>2} {'delta rule':>11} {'attention':>10} {'rest':>8} {'total':>8} "
              f"{'/ c=1':>7} {'1/c':>6}")
        for mixer in args.mixers:
            one = max(sum(saved.values()) for saved, _ in runs[mixer, 1])
            for c in args.cp:
                saved = max((saved for saved, _ in runs[mixer, c]), key=lambda s: sum(s.values()))
                delta_rule = saved["deltanet"] + saved["gated_deltanet"]
                total = sum(saved.values())
                print(f"{mixer:>15} {c:>2} {delta_rule / mib:>11.1f} {saved['attention'] / mib:>10.1f} "
                      f"{saved['rest'] / mib:>8.1f} {total / mib:>8.1f} {total / one:>7.3f} {1 / c:>6.3f}")
                figures["memory"].append(dict(mixer=mixer, cp=c, delta_rule=delta_rule, attention=saved["attention"],
                                              rest=saved["rest"], total=total, over_cp1=total / one))
    if "comm" in args.parts:
        print(f"\ncommunication per layer and forward, T {args.length}, fp32: bytes each rank's all-gathers deliver "
              "(KiB, every piece, its own included); predicted: kernels.context_parallel_bytes (transitions), the "
              "estimator's context_parallel_halo_bytes (conv windows, in bf16, scaled to fp32) and "
              "context_parallel_comm_bytes (keys, values; its other c - 1 pieces in bf16, scaled to c pieces in fp32)")
        print(f"{'mixer':>15} {'c':>2} {'layer':>15} {'carries':>20} {'gathered':>10} {'predicted':>10}")
        for mixer in args.mixers:
            for c in args.cp[1:]:
                config = _config(args, mixer, c)
                layout = Layout(gpus=c, seq_length=args.length, context_parallel_size=c)
                predicted = context_parallel_comm_bytes(config, layout)
                halo = context_parallel_halo_bytes(config, layout)
                received = runs[mixer, c][0][1]  # every rank's gathers deliver the same
                for (layer, what), nbytes in sorted(received.items()):
                    per_layer = nbytes / config.layer_mixers.count(layer)
                    expected = {"transitions [P | N]": context_parallel_bytes(
                                    c, 1, args.heads, args.hidden // args.heads, args.hidden // args.heads),
                                "conv windows": halo[config.layer_mixers.index(layer)] * 2,
                                "keys, values": predicted[config.layer_mixers.index(layer)] * 2 * c / (c - 1)
                                }.get(what)
                    shown = "-" if expected is None else f"{expected / 1024:.1f}"
                    print(f"{mixer:>15} {c:>2} {layer:>15} {what:>20} {per_layer / 1024:>10.1f} {shown:>10}")
                    figures["comm"].append(dict(mixer=mixer, cp=c, layer=layer, carries=what, gathered=per_layer,
                                                predicted=expected))
    if "drift" in args.parts:
        print(f"\nbf16 drift over one row of {args.drift_length} tokens (no-grad forward, every position)")
        columns = ("max |d logit|", "mean |d logit|", "max |d logp|", "mean |d logp|", "last quarter")
        print(f"{'mixer':>15} {'c':>2} {'against':>9} " + " ".join(f"{name:>15}" for name in columns))
        for mixer in args.mixers:
            for c, against, *diffs in _drift(args, mixer):
                print(f"{mixer:>15} {c:>2} {against:>9} " + " ".join(f"{d:>15.2e}" for d in diffs))
                figures["drift"].append(dict(mixer=mixer, cp=c, against=against, **dict(zip(
                    ("max_logits", "mean_logits", "max_log_probs", "mean_log_probs", "mean_log_probs_last_quarter"),
                    diffs))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
