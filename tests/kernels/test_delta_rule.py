"""delta_rule against fla's independent recurrence, its own decode step, truncated runs, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.delta_rule.naive import delta_rule_recurrence

from megatron_refine.kernels import delta_rule, delta_rule_step, fla_available, recurrent_delta_rule


def make_inputs(B=2, T=37, H=3, K=16, V=8, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    h0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, beta, h0)]


def _head_first(x):
    return x.transpose(1, 2)


@pytest.mark.parametrize("T, chunk_size", [(1, 16), (16, 16), (37, 16), (64, 64), (100, 32), (50, 7)])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_forward_and_gradients_equal_fla_recurrence(T, chunk_size, with_initial_state):
    q, k, v, beta, h0 = make_inputs(T=T, requires_grad=True)
    h0 = h0 if with_initial_state else None
    o, S = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    ref_o, ref_S = delta_rule_recurrence(*map(_head_first, (q, k, v, beta)), initial_state=h0, output_final_state=True)
    ref_o = _head_first(ref_o)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(S, ref_S, atol=2e-5, rtol=1e-5)

    g = torch.Generator().manual_seed(1)
    do, dS = torch.randn(o.shape, generator=g), torch.randn(S.shape, generator=g)
    inputs = [q, k, v, beta] + ([h0] if with_initial_state else [])
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_o * do).sum() + (ref_S * dS).sum(), inputs)
    for name, a, b in zip("q k v beta h0".split(), grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_step_looped_over_time_equals_chunked():
    q, k, v, beta, h0 = make_inputs(T=23)
    o, S = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=8)
    state, outs = h0, []
    for t in range(q.shape[1]):
        o_t, state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(state, S, atol=2e-5, rtol=1e-5)
    o_rec, S_rec = recurrent_delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o_rec, o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(S_rec, S, atol=2e-5, rtol=1e-5)


def test_states_after_equal_final_state_of_truncated_runs():
    q, k, v, beta, h0 = make_inputs(T=45)
    positions = torch.tensor([[0, 15, 16, 44], [3, 31, 32, 20]])
    _, _, states_after = delta_rule(q, k, v, beta, initial_state=h0, chunk_size=16, output_states_after=True)
    states = states_after(positions)
    assert states.shape == (2, 4, 3, 16, 8)
    for b in range(2):
        for i, p in enumerate(positions[b].tolist()):
            _, S = delta_rule(
                q[b : b + 1, : p + 1], k[b : b + 1, : p + 1], v[b : b + 1, : p + 1], beta[b : b + 1, : p + 1],
                initial_state=h0[b : b + 1], output_final_state=True, chunk_size=16,
            )
            torch.testing.assert_close(states[b, i], S[0], atol=2e-5, rtol=1e-5)


def test_states_after_gradients_equal_truncated_runs():
    """A loss on a branch state backpropagates into the shared forward exactly as into a truncated run."""
    q, k, v, beta, h0 = make_inputs(B=1, T=30, requires_grad=True)
    p = 21
    _, _, states_after = delta_rule(q, k, v, beta, initial_state=h0, chunk_size=8, output_states_after=True)
    states = states_after(torch.tensor([[p]]))
    grads = torch.autograd.grad(states.square().sum(), [q, k, v, beta, h0], allow_unused=True)
    _, S = delta_rule(
        q[:, : p + 1], k[:, : p + 1], v[:, : p + 1], beta[:, : p + 1], initial_state=h0,
        output_final_state=True, chunk_size=8,
    )
    ref = torch.autograd.grad(S.square().sum(), [q, k, v, beta, h0], allow_unused=True)
    for a, b in zip(grads[1:], ref[1:]):  # q does not enter a state
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0] is None or grads[0].abs().max() == 0


def test_gradcheck_float64():
    q, k, v, beta, h0 = make_inputs(B=1, T=7, H=2, K=4, V=3, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[2, 5]])

    def fn(q, k, v, beta, h0):
        o, S, states_after = delta_rule(
            q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=3, output_states_after=True
        )
        return o, S, states_after(positions)

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, h0))


def test_fp64_is_kept_and_half_precision_returns_its_dtype():
    q, k, v, beta, _ = make_inputs(T=9, dtype=torch.float64)
    o, S = delta_rule(q, k, v, beta, output_final_state=True)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    q, k, v, beta, _ = make_inputs(T=9)
    o, S = delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert not fla_available(q.bfloat16())  # CPU tensors never dispatch to Triton


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v, b, h: (q[0], k, v, b, h), r"q must have 4 dims \[B, T, H, K\]"),
        (lambda q, k, v, b, h: (q, k[:, :, :2], v, b, h), r"k has shape .* expected"),
        (lambda q, k, v, b, h: (q, k, v[:, :, :2], b, h), r"same batch, length and number of heads"),
        (lambda q, k, v, b, h: (q, k, v, b.clone().fill_(float("nan")), h), "beta contains NaN or Inf"),
        (lambda q, k, v, b, h: (q, k, v, b, h[:, :1]), r"initial_state has shape"),
    ],
)
def test_bad_input_raises_a_clear_error(mutate, message):
    q, k, v, beta, h0 = mutate(*make_inputs(T=5))
    with pytest.raises((ValueError, TypeError), match=message):
        delta_rule(q, k, v, beta, initial_state=h0)


def test_bad_positions_raise():
    q, k, v, beta, _ = make_inputs(T=5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        delta_rule(q, k, v, beta, output_states_after=True)[2](torch.tensor([[5], [0]]))
    with pytest.raises(ValueError, match="batch"):
        delta_rule(q, k, v, beta, output_states_after=True)[2](torch.tensor([[1]]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernel needs CUDA")
def test_fla_kernel_matches_reference_in_bf16():
    q, k, v, beta, h0 = (x.cuda() for x in make_inputs(B=2, T=300, H=4, K=64, V=64))
    args = [x.bfloat16().requires_grad_() for x in (q, k, v, beta)]
    assert fla_available(args[0])
    _assert_fla_matches_reference(args, initial_state=h0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernel needs CUDA")
def test_fla_varlen_kernel_matches_reference_in_bf16():
    lengths = [70, 1, 129, 100]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    q, k, v, beta, _ = (x.cuda() for x in make_inputs(B=1, T=sum(lengths), H=4, K=64, V=64))
    h0 = torch.randn(len(lengths), 4, 64, 64, device="cuda")
    args = [x.bfloat16().requires_grad_() for x in (q, k, v, beta)]
    _assert_fla_matches_reference(args, initial_state=h0, cu_seqlens=cu_seqlens)


def _assert_fla_matches_reference(args, **kwargs):
    """fla's kernel (bf16 inputs) against the PyTorch path: outputs, final states and input gradients."""
    o, S = delta_rule(*args, output_final_state=True, **kwargs)
    ref_o, ref_S = delta_rule(*args, output_final_state=True, use_reference=True, **kwargs)
    torch.testing.assert_close(o.float(), ref_o.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(S.float(), ref_S.float(), atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(o.float().sum(), args)
    ref_grads = torch.autograd.grad(ref_o.float().sum(), args)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
