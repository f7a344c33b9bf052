"""Newton-Schulz orthogonalisation of fast-weight updates (LaCT's Muon option), in fp32."""

from __future__ import annotations

from typing import Sequence

import torch

# LaCT's per-iteration quintic schedule (5 steps, from the modded-nanogpt Muon lineage).
LACT_NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
# The common Muon form: one coefficient triple repeated 5 times.
MUON_NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 5


def zeropower_via_newtonschulz5(
    G: torch.Tensor, coefficients: Sequence[tuple[float, float, float]] = LACT_NS_COEFFICIENTS, eps: float = 1e-7
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G [..., m, n] (singular values pushed towards 1).

    Frobenius-normalised first so the spectral norm is at most 1; X <- a X + (b A + c A^2) X, A = X X^T,
    on the wide orientation so A is the smaller Gram matrix. Differentiable.
    """
    X = G if G.dtype == torch.float64 else G.float()
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transpose else X
