"""How much LaCT's logits depend on the precision of Muon's Newton-Schulz: ours (fp32) against the authors' (bf16,
their `ttt_operation.zeropower_via_newtonschulz5` run eagerly), and against a second bf16 rounding (each statement's
elementwise ops in fp32, rounded once, as a compiled kernel fuses them), on a LaCT checkpoint and on the same
shapes with every weight random (as the conversion tests' checkpoints).

    python benchmarks/newton_schulz_precision.py --load checkpoints/lact-trained
    python benchmarks/newton_schulz_precision.py --load checkpoints/lact-trained --length 2048 --rows 2

Inputs: held-out documents of the built-in corpus (seed 123; the demo's data has seed 0), byte tokenizer, packed
into rows. Reported: the relative L2 change of the logits at the positions after the first fast-weight update
(the last row's first chunk reads the initial weights and does not depend on it), and the NTP loss there.
"""

from __future__ import annotations

from megatron_refine.warnings import filter_library_warnings

filter_library_warnings()  # before the libraries below are imported

import argparse

import torch
import torch.nn.functional as F

from megatron_refine.kernels.lact import chunk, muon
from megatron_refine.runtime import destroy, initialize


def newton_schulz_bf16(G: torch.Tensor, coefficients=muon.LACT_NS_COEFFICIENTS, eps: float = 1e-7,
                       fused: bool = False) -> torch.Tensor:
    """The authors' bf16 iteration; `fused`: each statement's elementwise ops in fp32, rounded to bf16 once."""
    X = G.bfloat16()
    transpose = X.shape[-2] > X.shape[-1]
    X = X.mT if transpose else X
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients:
        A = X @ X.mT
        if fused:
            B = (b * A.float() + c * (A @ A).float()).bfloat16()
            X = (a * X.float() + (B @ X).float()).bfloat16()
        else:
            X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if transpose else X).float()


VARIANTS = {
    "fp32 (ours)": muon.zeropower_via_newtonschulz5,
    "bf16 (authors')": newton_schulz_bf16,
    "bf16, fused rounding": lambda G, coefficients=muon.LACT_NS_COEFFICIENTS: newton_schulz_bf16(G, coefficients,
                                                                                                fused=True),
}


def _model(load: str):
    from megatron.core import dist_checkpointing

    from megatron_refine.models import build_model, get_config, get_mixer
    from megatron_refine.training.checkpointing import checkpoint_dir, latest_iteration, load_checkpoint

    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir(load, latest_iteration(load))))
    args = common["config"]["model"]
    config = get_config(args["config"], use_cpu_initialization=True, perform_initialization=False, **args["overrides"])
    if not any(get_mixer(m).uses_muon(config) for m in config.mixers):
        raise ValueError(f"{load} holds a {config.mixer} model without Muon: pass a LaCT checkpoint with use_muon")
    model = build_model(config, common["vocab_size"])
    load_checkpoint(load, model)
    return model.eval()


def _tokens(rows: int, length: int) -> torch.Tensor:
    from megatron_refine.data.corpus import generate_documents

    flat = []
    for text in generate_documents(50 * rows * length // 1000 + 100, seed=123):
        flat += [*text.encode(), 256]
        if len(flat) >= rows * length:
            break
    return torch.tensor(flat[: rows * length]).view(rows, length)  # [B, T]


def measure(model, tokens: torch.Tensor) -> dict:
    after = slice(model.config.lact_chunk_size, None)
    logits = {}
    for name, newton_schulz in VARIANTS.items():
        chunk.zeropower_via_newtonschulz5 = newton_schulz
        try:
            with torch.no_grad():
                logits[name] = model(tokens, None, None)[:, after, : model.tokenizer_vocab_size].float()
        finally:
            chunk.zeropower_via_newtonschulz5 = muon.zeropower_via_newtonschulz5
    names = list(VARIANTS)
    change = lambda a, b: ((logits[a] - logits[b]).norm() / logits[b].norm()).item()  # noqa: E731
    loss = {n: F.cross_entropy(x[:, :-1].flatten(0, 1), tokens[:, after][:, 1:].flatten()).item()
            for n, x in logits.items()}
    return (f"logits moved {change(names[1], names[0]):.1%} by bf16 (vs fp32), {change(names[2], names[1]):.1%} by "
            f"the other bf16 rounding (vs bf16); loss " + ", ".join(f"{n} {v:.4f}" for n, v in loss.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a LaCT checkpoint folder (use_muon)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    initialize(device="cpu")
    try:
        model = _model(args.load)
        cfg = model.config
        tokens = _tokens(args.rows, args.length)
        print(f"{args.load}: hidden {cfg.hidden_size}, {cfg.num_lact_heads} fast-weight heads of dim "
              f"{cfg.lact_head_dim}, chunk {cfg.lact_chunk_size}; {args.rows} x {args.length} tokens")
        print("checkpoint:    ", measure(model, tokens))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        print("random weights:", measure(model, tokens))
    finally:
        destroy()


if __name__ == "__main__":
    main()
