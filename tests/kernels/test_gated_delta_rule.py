"""gated_delta_rule against fla's independent recurrence, autograd through its own forward, its decode step,
truncated and separate runs, delta_rule (g = 0), strong decays, and gradcheck."""

import pytest
import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from host_reads import HostReads

from megatron_refine.kernels import (
    delta_rule,
    gated_delta_rule,
    gated_delta_rule_step,
    get_debug_checks,
    recurrent_gated_delta_rule,
    set_debug_checks,
)


def make_inputs(B=2, T=37, H=3, K=16, V=8, dtype=torch.float32, seed=0, requires_grad=False, N=None):
    """q, k, v, g, beta, h0: g log decays (exp(g) = sigmoid(randn + 1), in (0, 1)), h0 one per sequence."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype) + 1)
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    h0 = torch.randn(N or B, H, K, V, generator=gen, dtype=dtype)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, g, beta, h0)]


def weighted_loss(outputs, seed=1):
    """sum(x * random weights) over the outputs: every output's gradient is a different random tensor."""
    gen = torch.Generator().manual_seed(seed)
    return sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in outputs)


def grads(outputs, inputs):
    return torch.autograd.grad(weighted_loss(outputs), inputs, allow_unused=True)


def assert_all_close(actual, expected, names, **tolerances):
    for name, a, b in zip(names, actual, expected):
        torch.testing.assert_close(a, b, **tolerances, msg=lambda m: f"{name}: {m}")


NAMES = "q k v g beta h0".split()


@pytest.mark.parametrize("T, chunk_size", [(1, 16), (37, 16), (64, 64), (50, 7)])
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_forward_and_gradients_equal_fla_recurrence(T, chunk_size, with_initial_state):
    """fp64 inputs: ours in fp64, fla's naive recurrence in fp32 (it casts), hence the fp32 tolerances."""
    q, k, v, g, beta, h0 = make_inputs(T=T, dtype=torch.float64, requires_grad=True)
    h0 = h0 if with_initial_state else None
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk_size)
    ref_o, ref_S = naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    ref_o, ref_S = ref_o.double(), ref_S.double()
    assert_all_close([o, S], [ref_o, ref_S], ["o", "final state"], atol=2e-6, rtol=1e-5)
    inputs = [q, k, v, g, beta] + ([h0] if with_initial_state else [])
    assert_all_close(grads([o, S], inputs), grads([ref_o, ref_S], inputs), NAMES, atol=1e-5, rtol=1e-5)


def chunk_equations(q, k, v, g, beta, h0, C):
    """The chunk equations of `chunk.py`'s docstring, written plainly for autograd: a chunk at a time, a real
    triangular solve, no in-place update. [B, T, H, D] in, (o, final state) out."""
    scale = q.shape[-1] ** -0.5
    S, outputs = h0, []
    for start in range(0, q.shape[1], C):
        q_c, k_c, v_c = (x[:, start : start + C].transpose(1, 2) for x in (q, k, v))  # [B, H, c, D]
        g_c, b_c = (x[:, start : start + C].transpose(1, 2)[..., None] for x in (g, beta))  # [B, H, c, 1]
        G = g_c.cumsum(-2)
        lower = torch.ones(G.shape[-2], G.shape[-2], dtype=torch.bool).tril()
        D = torch.where(lower, G - G.transpose(-1, -2), float("-inf")).exp()  # exp(G_t - G_s), t >= s
        L = ((b_c * k_c) @ k_c.transpose(-1, -2) * D).tril(-1)
        eye = torch.eye(L.shape[-1], dtype=L.dtype)
        U = torch.linalg.solve_triangular(eye + L, b_c * v_c - (b_c * G.exp() * k_c) @ S, upper=False)
        outputs.append(((scale * q_c * G.exp()) @ S + (scale * q_c @ k_c.transpose(-1, -2) * D) @ U).transpose(1, 2))
        S = G[..., -1:, :].exp() * S + (k_c * (G[..., -1:, :] - G).exp()).transpose(-1, -2) @ U
    return torch.cat(outputs, 1), S


@pytest.mark.parametrize("T, chunk_size", [(30, 8), (16, 16)])
def test_written_backward_equals_autograd_through_the_chunk_equations(T, chunk_size):
    """fp64: the hand-written backward (dg included) against autograd through the same chunk equations."""
    inputs = make_inputs(T=T, dtype=torch.float64, requires_grad=True)
    o, S = gated_delta_rule(*inputs[:5], initial_state=inputs[5], output_final_state=True, chunk_size=chunk_size)
    ref_o, ref_S = chunk_equations(*inputs, chunk_size)
    assert_all_close([o, S], [ref_o, ref_S], ["o", "final state"], atol=1e-12, rtol=1e-10)
    assert_all_close(grads([o, S], inputs), grads([ref_o, ref_S], inputs), NAMES, atol=1e-11, rtol=1e-10)


def test_gradcheck_float64():
    q, k, v, g, beta, h0 = make_inputs(B=1, T=6, H=1, K=3, V=2, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[1, 4]])

    def fn(q, k, v, g, beta, h0):
        o, S, states_after = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              chunk_size=3, output_states_after=True)
        return o, S, states_after(positions)

    assert torch.autograd.gradcheck(fn, (q, k, v, g, beta, h0))


def test_chunked_equals_recurrent_and_the_decode_step_chain():
    q, k, v, g, beta, h0 = make_inputs(T=23)
    o, S = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=8)
    o_rec, S_rec = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_all_close([o_rec, S_rec], [o, S], ["o", "final state"], atol=2e-5, rtol=1e-5)
    state, outs = h0, []
    for t in range(q.shape[1]):
        o_t, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
    assert_all_close([torch.stack(outs, 1), state], [o, S], ["o", "final state"], atol=2e-5, rtol=1e-5)


def test_states_after_equal_truncated_recurrent_runs_with_gradients():
    """Branch states (any chunk, its first and last slot) equal the recurrence over the prefix; a loss on them
    backpropagates into the shared forward (g included) exactly as into the prefix runs."""
    q, k, v, g, beta, h0 = make_inputs(T=45, requires_grad=True)
    positions = torch.tensor([[0, 15, 16, 44], [3, 31, 32, 20]])
    _, _, states_after = gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=16,
                                          output_states_after=True)
    states = states_after(positions)
    assert states.shape == (2, 4, 3, 16, 8)
    expected = torch.stack([
        torch.stack([
            recurrent_gated_delta_rule(*(x[b : b + 1, : p + 1] for x in (q, k, v, g, beta)),
                                       initial_state=h0[b : b + 1], output_final_state=True)[1][0]
            for p in positions[b].tolist()
        ])
        for b in range(2)
    ])
    torch.testing.assert_close(states, expected, atol=2e-5, rtol=1e-5)
    inputs = [k, v, g, beta, h0]  # q does not enter a state
    assert_all_close(grads([states], inputs), grads([expected], inputs), NAMES[1:], atol=5e-5, rtol=1e-4)


def test_packed_equals_separate_runs():
    """Varlen: each sequence restarts from its own initial state; outputs, final and branch states, gradients."""
    lengths = [9, 1, 20, 7]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, g, beta, h0 = make_inputs(B=1, T=sum(lengths), N=len(lengths), requires_grad=True)
    positions = torch.tensor([[8, 9, 10, 29, 36, 20]])
    o, S, states_after = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          chunk_size=8, cu_seqlens=cu_seqlens, output_states_after=True)
    packed = [o, S, states_after(positions)]
    outs, finals, branch = [], [], {}
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        o_i, S_i, after_i = gated_delta_rule(*(x[:, start:end] for x in (q, k, v, g, beta)),
                                             initial_state=h0[i : i + 1], output_final_state=True, chunk_size=8,
                                             output_states_after=True)
        outs.append(o_i)
        finals.append(S_i)
        for p in positions[0].tolist():
            if start <= p < end:
                branch[p] = after_i(torch.tensor([[p - start]]))[0, 0]
    separate = [torch.cat(outs, 1), torch.cat(finals), torch.stack([branch[p] for p in positions[0].tolist()])[None]]
    assert_all_close(packed, separate, ["o", "final", "states after"], atol=1e-5, rtol=1e-5)
    inputs = [q, k, v, g, beta, h0]
    assert_all_close(grads(packed, inputs), grads(separate, inputs), NAMES, atol=5e-5, rtol=1e-4)


def test_zero_log_decay_equals_delta_rule():
    q, k, v, g, beta, h0 = make_inputs(T=30, requires_grad=True)
    zero = torch.zeros_like(g, requires_grad=True)
    positions = torch.tensor([[4, 29], [0, 17]])
    gated = gated_delta_rule(q, k, v, zero, beta, initial_state=h0, output_final_state=True, chunk_size=8,
                             output_states_after=True)
    plain = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, chunk_size=8,
                       output_states_after=True)
    gated, plain = [*gated[:2], gated[2](positions)], [*plain[:2], plain[2](positions)]
    assert_all_close(gated, plain, ["o", "final", "states after"], atol=1e-6, rtol=1e-6)
    inputs = [q, k, v, beta, h0]
    assert_all_close(grads(gated, inputs), grads(plain, inputs), "q k v beta h0".split(), atol=1e-5, rtol=1e-5)


def test_strong_decay_stays_finite():
    """g = -20 per token: exp(G) underflows to 0 over a chunk (never a division by it), so nothing is NaN or
    Inf, and the outputs still equal the recurrence's."""
    q, k, v, _, beta, h0 = make_inputs(T=40, requires_grad=True)
    g = torch.full(beta.shape, -20.0, requires_grad=True)
    o, S, states_after = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                          chunk_size=32, output_states_after=True)
    outputs = [o, S, states_after(torch.tensor([[3, 39], [31, 32]]))]
    for x in outputs + list(grads(outputs, [q, k, v, g, beta, h0])):
        assert torch.isfinite(x).all()
    ref_o, ref_S = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert_all_close([o, S], [ref_o, ref_S], ["o", "final state"], atol=2e-5, rtol=1e-5)


def test_dtypes():
    """fp64 stays fp64; half precision returns its dtype (fp32 states); g of any float dtype is used in fp32."""
    q, k, v, g, beta, _ = make_inputs(T=9, dtype=torch.float64)
    o, S = gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    q, k, v, g, beta, _ = make_inputs(T=9)
    half = [x.bfloat16() for x in (q, k, v)]
    o, S = gated_delta_rule(*half, g.bfloat16(), beta.bfloat16(), output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o32, _ = gated_delta_rule(*half, g.bfloat16().float(), beta.bfloat16(), output_final_state=True)
    torch.testing.assert_close(o, o32, atol=0, rtol=0)


def test_no_host_reads_with_the_value_checks_off():
    """As on CUDA by default: the forward, backward, branch states and decode steps never stall the stream."""
    q, k, v, g, beta, h0 = make_inputs(T=40, requires_grad=True)
    before = get_debug_checks()
    set_debug_checks(False)
    try:
        with HostReads() as seen:
            o, S, states_after = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                  chunk_size=16, output_states_after=True)
            weighted_loss([o, S, states_after(torch.tensor([[3, 39], [0, 16]]))]).backward()
            state = h0
            for t in range(3):
                _, state = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
    finally:
        set_debug_checks(before)
    assert not seen.calls, seen.calls


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda g: g[..., :2], r"g has shape .* expected"),
        (lambda g: g[0], r"g must have 3 dims \[B, T, H\]"),
        (lambda g: g.clone().fill_(float("nan")), "g contains NaN or Inf"),
        (lambda g: g.long(), "g must be a floating-point log decay"),
    ],
)
def test_bad_log_decay_raises_a_clear_error(mutate, message):
    q, k, v, g, beta, _ = make_inputs(T=5)
    with pytest.raises((ValueError, TypeError), match=message):
        gated_delta_rule(q, k, v, mutate(g), beta)
    with pytest.raises((ValueError, TypeError), match=message):
        recurrent_gated_delta_rule(q, k, v, mutate(g), beta)


def test_bad_step_inputs_raise():
    q, k, v, g, beta, h0 = make_inputs(T=1)
    args = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0
    gated_delta_rule_step(*args)
    with pytest.raises(ValueError, match=r"g has shape .* expected .* \[B, H\]"):
        gated_delta_rule_step(*args[:3], g[:1, 0], *args[4:])
    with pytest.raises(ValueError, match="g contains NaN or Inf"):
        gated_delta_rule_step(*args[:3], torch.full_like(args[3], float("inf")), *args[4:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernel needs CUDA")
def test_fla_kernel_matches_reference_in_bf16():
    """fla's chunk_gated_delta_rule (bf16 inputs, fp32 g) against the PyTorch path, packed, from initial states."""
    lengths = [70, 1, 129, 100]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    q, k, v, g, beta, h0 = (x.cuda() for x in make_inputs(B=1, T=sum(lengths), H=4, K=64, V=64, N=len(lengths)))
    args = [x.bfloat16().requires_grad_() for x in (q, k, v)] + [g.requires_grad_(), beta.bfloat16().requires_grad_()]
    kwargs = dict(initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    o, S = gated_delta_rule(*args, **kwargs)
    ref_o, ref_S = gated_delta_rule(*args, use_reference=True, **kwargs)
    assert_all_close([o.float(), S], [ref_o.float(), ref_S], ["o", "final"], atol=2e-2, rtol=2e-2)
    fla_grads = torch.autograd.grad(o.float().sum(), args)
    ref_grads = torch.autograd.grad(ref_o.float().sum(), args)
    assert_all_close([x.float() for x in fla_grads], [x.float() for x in ref_grads], NAMES, atol=5e-2, rtol=5e-2)
