"""Where to branch rollouts: high-entropy positions, one per chunk of the sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("entropy", "uniform", "argmax", "argmin")


def smooth_entropy(entropy: torch.Tensor, k: int) -> torch.Tensor:
    """Centred moving average over positions, window k (k + 1 when k is even), stride 1; [B, T] -> [B, T].

    As in the release, the zero padding at the two ends counts in the mean (count_include_pad=True). Those
    window // 2 <= k edge positions lie inside the selection margins (>= k), so no draw depends on them.
    """
    window = k + 1 if k % 2 == 0 else k
    return F.avg_pool1d(entropy[:, None], window, stride=1, padding=window // 2, count_include_pad=True)[:, 0]


def min_sequence_length(n_chunks: int, margin: int) -> int:
    """The shortest sequence with n_chunks candidate positions between the two margins."""
    return n_chunks + 2 * margin


def eligible_positions(position_ids: torch.Tensor, sequence_ids: torch.Tensor, margin: int) -> torch.Tensor:
    """Packed documents: [B, T] -> where a rollout may start: at least `margin` tokens into its document and
    at least `margin` (>= k) tokens before the document ends, so its k-token truth stays in the document."""
    T = sequence_ids.shape[1]
    same_ahead = torch.zeros_like(sequence_ids, dtype=torch.bool)  # the document runs on `margin` tokens past t
    if margin < T:
        same_ahead[:, : T - margin] = sequence_ids[:, margin:] == sequence_ids[:, : T - margin]
    return (position_ids >= margin) & same_ahead


def select_positions(
    entropy: torch.Tensor,
    *,
    n_chunks: int = 8,
    k: int = 5,
    margin: int = 20,
    mode: str = "entropy",
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """entropy [B, T] (of predicting token t+1 from tokens <= t) -> positions [B, n_chunks].

    The candidates t in [margin, T - margin) are split into n_chunks equal chunks (the last takes the
    remainder); each chunk gives one position: drawn from softmax(smoothed entropy) (`entropy`), uniformly,
    or the chunk's argmax / argmin. A rollout from t reads the true continuation t+1..t+k, so margin >= k.
    eligible [B, T] (packed documents, `eligible_positions`): only those are drawn; a chunk with none gives
    a position that is not eligible, which the caller masks out (`eligible.gather(1, positions)`).
    """
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")
    if margin < k:
        raise ValueError(f"margin ({margin}) must be >= k ({k}): a rollout from t compares with tokens t+1..t+k")
    B, T = entropy.shape
    span = T - 2 * margin
    if T < min_sequence_length(n_chunks, margin):
        raise ValueError(
            f"sequence length {T} leaves {span} candidate positions after the margins of {margin} tokens, fewer than "
            f"n_chunks={n_chunks}: use longer sequences (>= {min_sequence_length(n_chunks, margin)}) or fewer "
            "chunks / a smaller margin"
        )
    scores = smooth_entropy(entropy.float(), k)
    allowed = torch.ones_like(scores, dtype=torch.bool) if eligible is None else eligible
    size = span // n_chunks
    positions = []
    for c in range(n_chunks):
        lo = margin + c * size
        hi = margin + span if c == n_chunks - 1 else lo + size
        chunk, ok = scores[:, lo:hi], allowed[:, lo:hi]  # [B, L]
        ok = ok | ~ok.any(-1, keepdim=True)  # a chunk with no eligible position draws from all (masked later)
        if mode == "argmax":
            pick = chunk.masked_fill(~ok, -torch.inf).argmax(-1)
        elif mode == "argmin":
            pick = chunk.masked_fill(~ok, torch.inf).argmin(-1)
        else:
            weights = ok.float() if mode == "uniform" else torch.softmax(chunk.masked_fill(~ok, -torch.inf), dim=-1)
            on = weights.device if generator is None else generator.device  # multinomial wants them together
            pick = torch.multinomial(weights.to(on), 1, generator=generator)[:, 0].to(chunk.device)
        positions.append(lo + pick)
    return torch.stack(positions, dim=1)
