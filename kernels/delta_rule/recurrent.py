"""Token-by-token (gated) delta rule: the decode step, and the recurrence it loops into (a reference and a
baseline)."""

from __future__ import annotations

import torch

from megatron_refine.kernels.utils import compute_dtype


def delta_rule_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: q, k [B, H, K], v [B, H, V], beta [B, H], state [B, H, K, V], log decay g [B, H] (None: no
    decay, DeltaNet) -> (o [B, H, V], new state fp32)."""
    acc = compute_dtype(v)
    q, k, v, beta, S = q.to(acc), k.to(acc), v.to(acc), beta.to(acc), state.to(acc)
    if g is not None:
        S = S * g.to(acc).exp()[..., None, None]
    new_value = beta[..., None] * (v - torch.einsum("bhk,bhkv->bhv", k, S))  # [B, H, V]
    S = S + k[..., :, None] * new_value[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q * scale, S), S


def recurrent_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step looped over T: [B, T, H, D] in (g [B, T, H] or None), (o [B, T, H, V], final state) out."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=compute_dtype(v)) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        o_t, S = delta_rule_step_torch(q[:, t], k[:, t], v[:, t], beta[:, t], S, scale,
                                       None if g is None else g[:, t])
        outputs.append(o_t)
    return torch.stack(outputs, dim=1).to(v.dtype), (S if output_final_state else None)
