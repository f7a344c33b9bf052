"""Where to branch rollouts: high-entropy positions, one per chunk of the sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_refine.models.generation import sample_categorical

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


def chunks_with_candidates(lengths: torch.Tensor, n_chunks: int, margin: int) -> torch.Tensor:
    """Rows of `lengths` [B] real positions: which of their n_chunks chunks hold a candidate [B, n_chunks] (a row
    with fewer than n_chunks candidates between its margins has empty chunks, whose draws the caller masks out)."""
    return torch.arange(n_chunks, device=lengths.device) < (lengths - 2 * margin)[:, None]


def select_positions(
    entropy: torch.Tensor,
    *,
    n_chunks: int = 8,
    k: int = 5,
    margin: int = 20,
    mode: str = "entropy",
    generator: torch.Generator | None = None,
    eligible: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """entropy [B, T] (of predicting token t+1 from tokens <= t) -> positions [B, n_chunks].

    The candidates t in [margin, T - margin) are split into n_chunks equal chunks (the last takes the
    remainder); each chunk gives one position: drawn from softmax(smoothed entropy) (`entropy`), uniformly,
    or the chunk's argmax / argmin. A rollout from t reads the true continuation t+1..t+k, so margin >= k.
    lengths [B]: each row's real positions (a padded document, a post-training prompt: the labels that belong to
    it); row b's candidates are then [margin, lengths[b] - margin), chunked the same way. A chunk with no
    candidate (`chunks_with_candidates`) gives position `margin`, which the caller masks out.
    eligible [B, T] (packed documents, `eligible_positions`): only those are drawn; a chunk with none gives
    a position that is not eligible, which the caller masks out (`eligible.gather(1, positions)`).
    """
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")
    if margin < k:
        raise ValueError(f"margin ({margin}) must be >= k ({k}): a rollout from t compares with tokens t+1..t+k")
    B, T = entropy.shape
    if T < min_sequence_length(n_chunks, margin):
        raise ValueError(
            f"sequence length {T} leaves {T - 2 * margin} candidate positions after the margins of {margin} tokens, "
            f"fewer than n_chunks={n_chunks}: use longer sequences (>= {min_sequence_length(n_chunks, margin)}) or "
            "fewer chunks / a smaller margin"
        )
    scores = smooth_entropy(entropy.float(), k)
    allowed = torch.ones_like(scores, dtype=torch.bool) if eligible is None else eligible
    span = torch.full((B,), T - 2 * margin, device=scores.device) if lengths is None else lengths - 2 * margin
    size = (span // n_chunks).clamp(min=1)[:, None]
    offset = torch.arange(T, device=scores.device) - margin  # [T]
    chunk_of = torch.where((offset >= 0) & (offset < span[:, None]), (offset // size).clamp(max=n_chunks - 1), -1)
    fallback = offset == 0  # an empty chunk's position (masked out by the caller)
    positions = []
    for c in range(n_chunks):
        inside = chunk_of == c  # [B, T]
        inside = inside | (fallback & ~inside.any(-1, keepdim=True))
        ok = inside & allowed
        ok = ok | (inside & ~ok.any(-1, keepdim=True))  # a chunk with no eligible position draws from all of it
        if mode == "argmax":
            pick = scores.masked_fill(~ok, -torch.inf).argmax(-1)
        elif mode == "argmin":
            pick = scores.masked_fill(~ok, torch.inf).argmin(-1)
        else:
            weights = ok.float() if mode == "uniform" else torch.softmax(scores.masked_fill(~ok, -torch.inf), dim=-1)
            on = weights.device if generator is None else generator.device  # the generator draws on its device
            pick = sample_categorical(weights.to(on), generator).to(scores.device)
        positions.append(pick)
    return torch.stack(positions, dim=1)
