"""`delta_rule` on fla's `chunk_delta_rule` (the path CUDA runs) against its PyTorch path: outputs, final states,
branch states and every gradient, batched and packed (varlen), from an initial state."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_fp16

from megatron_refine.kernels import delta_rule, fla_available

H, K, V = 2, 32, 32


def inputs(B, T, N=None, seed=0):
    """fp16 leaves (the fla path's inputs) and the same values in fp32 (the reference's)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    h0 = 0.1 * torch.randn(N or B, H, K, V, generator=g)
    half = [x.half() for x in (q, k, v, beta)] + [h0]
    full = [x.float() for x in half]
    return [x.clone().requires_grad_() for x in half], [x.clone().requires_grad_() for x in full]


def run(args, states_at=None, cu_seqlens=None, use_reference=False, seed=1):
    q, k, v, beta, h0 = args
    out = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens,
                     output_states_after=states_at is not None, use_reference=use_reference)
    o, final = out[:2]
    g = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=g)).sum() + (final * torch.randn(final.shape, generator=g)).sum()
    states = None
    if states_at is not None:
        states = out[2](states_at)
        loss = loss + (states * torch.randn(states.shape, generator=g)).sum()
    loss.backward()
    return o, final, states, [x.grad for x in args]


def compare(fla, reference):
    names = ["o", "final state", "states after"]
    for name, a, b in zip(names, fla[:3], reference[:3]):
        if b is not None:
            assert_close_fp16(a, b.detach(), name)
    for name, a, b in zip(["dq", "dk", "dv", "dbeta", "dh0"], fla[3], reference[3]):
        assert_close_fp16(a, b, name, scale=2)


def test_the_fla_path_is_taken_on_cpu_in_fp16_only():
    x = torch.zeros(1, 1, H, K)
    assert fla_available(x.half())
    assert not fla_available(x.bfloat16()) and not fla_available(x)


@pytest.mark.parametrize("T", [64, 100])
def test_batch_matches_the_pytorch_path(T):
    half, full = inputs(2, T)
    compare(run(half), run(full, use_reference=True))


def test_varlen_matches_the_pytorch_path():
    cu_seqlens = torch.tensor([0, 40, 41, 150, 192])
    half, full = inputs(1, 192, N=4)
    compare(run(half, cu_seqlens=cu_seqlens), run(full, cu_seqlens=cu_seqlens, use_reference=True))


def test_branch_states_on_fla_match_the_pytorch_path():
    """The states after positions chosen after the forward (unsorted, repeated, in any chunk), with gradients."""
    positions = torch.tensor([[70, 3, 64, 70], [0, 129, 101, 63]])
    half, full = inputs(2, 130)
    compare(run(half, positions), run(full, positions, use_reference=True))


def test_packed_branch_states_on_fla_match_the_pytorch_path():
    """Packed documents: each position's state is its own document's (the chain restarts at every start)."""
    cu_seqlens = torch.tensor([0, 40, 41, 150, 192])
    positions = torch.tensor([[39, 0, 40, 120, 149, 191, 10]])
    half, full = inputs(1, 192, N=4)
    compare(run(half, positions, cu_seqlens), run(full, positions, cu_seqlens, use_reference=True))
