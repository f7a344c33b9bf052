"""Where to branch rollouts: high-entropy positions, one per chunk of the sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("entropy", "uniform", "argmax", "argmin")


def smooth_entropy(entropy: torch.Tensor, k: int) -> torch.Tensor:
    """Centred moving average over positions, window k (k + 1 when k is even), stride 1; [B, T] -> [B, T]."""
    window = k + 1 if k % 2 == 0 else k
    return F.avg_pool1d(entropy[:, None], window, stride=1, padding=window // 2, count_include_pad=False)[:, 0]


def min_sequence_length(n_chunks: int, margin: int) -> int:
    """The shortest sequence with n_chunks candidate positions between the two margins."""
    return n_chunks + 2 * margin


def select_positions(
    entropy: torch.Tensor,
    *,
    n_chunks: int = 8,
    k: int = 5,
    margin: int = 20,
    mode: str = "entropy",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """entropy [B, T] (of predicting token t+1 from tokens <= t) -> positions [B, n_chunks].

    The candidates t in [margin, T - margin) are split into n_chunks equal chunks (the last takes the
    remainder); each chunk gives one position: drawn from softmax(smoothed entropy) (`entropy`), uniformly,
    or the chunk's argmax / argmin. A rollout from t reads the true continuation t+1..t+k, so margin >= k.
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
    size = span // n_chunks
    positions = []
    for c in range(n_chunks):
        lo = margin + c * size
        hi = margin + span if c == n_chunks - 1 else lo + size
        chunk = scores[:, lo:hi]  # [B, L]
        if mode == "argmax":
            pick = chunk.argmax(-1)
        elif mode == "argmin":
            pick = chunk.argmin(-1)
        else:
            weights = torch.ones_like(chunk) if mode == "uniform" else torch.softmax(chunk, dim=-1)
            pick = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(chunk.device)
        positions.append(lo + pick)
    return torch.stack(positions, dim=1)
