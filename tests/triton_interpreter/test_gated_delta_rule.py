"""`gated_delta_rule` on fla's `chunk_gated_delta_rule` (the path CUDA runs) against its PyTorch path: outputs,
final states, branch states and every gradient (the log decays' included), batched and packed, from an initial
state."""

import torch
import torch.nn.functional as F
from conftest import assert_close_fp16

from megatron_refine.kernels import fla_available, gated_delta_rule

H, K, V = 2, 32, 32


def inputs(B, T, N=None, seed=0):
    """fp16 leaves (the fla path's inputs; g in fp32, as a GDN layer computes it) and the same values in fp32."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)  # [B, T, H] log decays in (-inf, 0)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = 0.1 * torch.randn(N or B, H, K, V, generator=gen)
    half = [x.half() for x in (q, k, v)] + [g, beta.half(), h0]
    full = [x.float() for x in half]
    return [x.clone().requires_grad_() for x in half], [x.clone().requires_grad_() for x in full]


def run(args, states_at=None, cu_seqlens=None, use_reference=False, seed=1):
    q, k, v, g, beta, h0 = args
    out = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                           output_states_after=states_at is not None, use_reference=use_reference)
    o, final = out[:2]
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen)).sum()
    states = None
    if states_at is not None:
        states = out[2](states_at)
        loss = loss + (states * torch.randn(states.shape, generator=gen)).sum()
    loss.backward()
    return o, final, states, [x.grad for x in args]


def compare(fla, reference):
    for name, a, b in zip(["o", "final state", "states after"], fla[:3], reference[:3]):
        if b is not None:
            assert_close_fp16(a, b.detach(), name)
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], fla[3], reference[3]):
        assert_close_fp16(a, b, name, scale=2)


def test_packed_with_initial_states_matches_the_pytorch_path():
    assert fla_available(torch.zeros(1, 1, H, K).half())
    cu_seqlens = torch.tensor([0, 40, 41, 130])
    half, full = inputs(1, 130, N=3)
    compare(run(half, cu_seqlens=cu_seqlens), run(full, cu_seqlens=cu_seqlens, use_reference=True))


def test_branch_states_on_fla_match_the_pytorch_path():
    """States after positions chosen after the forward (unsorted, across chunks), batched and packed: the chain of
    fla's kernel carries the log decays of each segment."""
    positions = torch.tensor([[70, 3], [63, 99]])
    half, full = inputs(2, 100)
    compare(run(half, positions), run(full, positions, use_reference=True))
    cu_seqlens = torch.tensor([0, 40, 41, 130])
    positions = torch.tensor([[39, 0, 40, 120, 129]])
    half, full = inputs(1, 130, N=3, seed=2)
    compare(run(half, positions, cu_seqlens), run(full, positions, cu_seqlens, use_reference=True))
