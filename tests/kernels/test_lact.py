"""lact_swiglu against a per-chunk loop written from the spec, its decode step, and its position states."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron_refine.kernels import (
    LACT_NS_COEFFICIENTS,
    LaCTState,
    lact_swiglu,
    lact_swiglu_step,
    low_rank_fast_weight,
    zeropower_via_newtonschulz5,
)

B, H, D, DH = 2, 2, 8, 12


def make_inputs(T=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    q = F.normalize(F.silu(rnd(B, T, H, D)), dim=-1)
    k = F.normalize(F.silu(rnd(B, T, H, D)), dim=-1)
    v = F.silu(rnd(B, T, H, D))
    lrs = [F.softplus(rnd(B, T, H) - 2.0) for _ in range(3)]
    momentum = torch.sigmoid(rnd(B, T, H))
    w0, w1, w2 = rnd(H, DH, D) / D**0.5, rnd(H, D, DH) / DH**0.5, rnd(H, DH, D) / D**0.5
    return dict(q=q, k=k, v=v, lr0=lrs[0], lr1=lrs[1], lr2=lrs[2], momentum=momentum, w0=w0, w1=w1, w2=w2)


def spec_lact(x, chunk_size, use_momentum, use_muon, weight_norm):
    """The spec, literally: per sequence and head, apply-then-update per chunk; each weight's update is
    gradient descent on -sum_t lr_t <f(k_t), v_t> (autograd), momentum, Newton-Schulz-5, weight norm."""
    T = x["q"].shape[1]
    out = torch.zeros_like(x["q"])
    f = lambda W, X: (F.silu(X @ W[0].T) * (X @ W[2].T)) @ W[1].T  # noqa: E731  X [L, D]

    def newton_schulz5(G):
        X = G.T if G.shape[0] > G.shape[1] else G
        X = X / (X.norm() + 1e-7)
        for a, b, c in LACT_NS_COEFFICIENTS:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X.T if G.shape[0] > G.shape[1] else X

    for b, h in itertools.product(range(B), range(H)):
        W = [x["w0"][h], x["w1"][h], x["w2"][h]]
        norms = [w.norm(dim=1, keepdim=True) for w in W]
        prev = [torch.zeros_like(w) for w in W]
        for s in range(0, T, chunk_size):
            e = min(s + chunk_size, T)
            out[b, s:e, h] = f(W, x["q"][b, s:e, h])
            if e - s < chunk_size:
                break
            K, V = x["k"][b, s:e, h], x["v"][b, s:e, h]
            dW = []
            for i, lr in enumerate((x["lr0"], x["lr1"], x["lr2"])):
                loss = -(lr[b, s:e, h, None] * f(W, K) * V).sum()
                dW.append(-torch.autograd.grad(loss, W[i], create_graph=True)[0])
            if use_momentum:
                m = x["momentum"][b, s:e, h].mean()
                dW = [d + m * p for d, p in zip(dW, prev)]
                prev = dW
            if use_muon:
                dW = [newton_schulz5(d) for d in dW]
            W = [w + d for w, d in zip(W, dW)]
            if weight_norm:
                W = [w / (w.norm(dim=1, keepdim=True) + 1e-5) * n for w, n in zip(W, norms)]
    return out


def run_op(x, chunk_size, use_momentum, use_muon, weight_norm, **kwargs):
    return lact_swiglu(
        x["q"], x["k"], x["v"], x["lr0"], x["lr1"], x["lr2"], x["w0"], x["w1"], x["w2"],
        chunk_size=chunk_size, momentum=x["momentum"] if use_momentum else None, use_muon=use_muon,
        weight_norm=weight_norm, **kwargs,
    )


OPTIONS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("use_momentum, use_muon, weight_norm", OPTIONS)
def test_forward_and_gradients_equal_the_spec_loop(use_momentum, use_muon, weight_norm):
    x = make_inputs(T=13)
    for t in x.values():
        t.requires_grad_()
    o, _ = run_op(x, 4, use_momentum, use_muon, weight_norm)
    ref = spec_lact(x, 4, use_momentum, use_muon, weight_norm)
    torch.testing.assert_close(o, ref, atol=1e-10, rtol=1e-8)

    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
    names = [n for n in x if use_momentum or n != "momentum"]
    grads = torch.autograd.grad((o * do).sum(), [x[n] for n in names])
    ref_grads = torch.autograd.grad((ref * do).sum(), [x[n] for n in names])
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m: f"grad {name}: {m}")
        assert a.abs().max() > 0, name


def test_first_chunk_reads_the_initial_weights_and_later_chunks_differ():
    x = make_inputs(T=10)
    o, _ = run_op(x, 5, False, False, True)
    q = x["q"].transpose(1, 2)  # [B, H, T, D]
    first = (F.silu(q[:, :, :5] @ x["w0"].mT) * (q[:, :, :5] @ x["w2"].mT)) @ x["w1"].mT
    torch.testing.assert_close(o[:, :5], first.transpose(1, 2))
    second = (F.silu(q[:, :, 5:] @ x["w0"].mT) * (q[:, :, 5:] @ x["w2"].mT)) @ x["w1"].mT
    assert not torch.allclose(o[:, 5:], second.transpose(1, 2))


@pytest.mark.parametrize("use_momentum, use_muon, weight_norm", [(False, False, False), (True, True, True)])
@pytest.mark.parametrize("T", [11, 12])
def test_decode_steps_equal_the_full_forward(use_momentum, use_muon, weight_norm, T):
    x = make_inputs(T=T)
    o, final = run_op(x, 4, use_momentum, use_muon, weight_norm, output_final_state=True)
    state = LaCTState.initial(
        x["w0"], x["w1"], x["w2"], B, 4, use_momentum=use_momentum, weight_norm=weight_norm
    )
    outs = []
    for t in range(T):
        o_t, state = lact_swiglu_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["lr0"][:, t], x["lr1"][:, t], x["lr2"][:, t],
            state, momentum=x["momentum"][:, t] if use_momentum else None, use_muon=use_muon,
        )
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 1), o)
    assert_states_close(state, final)


def assert_states_close(a: LaCTState, b: LaCTState):
    assert torch.equal(a.length, b.length)
    for name in ("w0", "w1", "w2", "k", "v", "lr", "momentum"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, msg=lambda m: f"{name}: {m}")
    for name in ("norms", "dw"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        for xi, yi in zip(x or (), y or ()):
            torch.testing.assert_close(xi, yi, msg=lambda m: f"{name}: {m}")


def test_states_after_equal_truncated_runs_and_decoding_continues_from_them():
    x = make_inputs(T=14)
    positions = torch.tensor([[2, 3, 9], [7, 12, 0]])
    o, _, states_after = run_op(x, 4, True, True, True, output_states_after=True)
    states = states_after(positions)
    for b, i in itertools.product(range(B), range(positions.shape[1])):
        p = positions[b, i].item()
        row = b * positions.shape[1] + i
        prefix = {n: (t[b : b + 1, : p + 1] if n in ("q", "k", "v", "lr0", "lr1", "lr2", "momentum") else t)
                  for n, t in x.items()}
        _, truncated = run_op(prefix, 4, True, True, True, output_final_state=True)
        one_row = LaCTState(
            **{n: (getattr(states, n)[row : row + 1] if torch.is_tensor(getattr(states, n)) else
                   tuple(t[row : row + 1] for t in getattr(states, n)))
               for n in ("w0", "w1", "w2", "k", "v", "lr", "length", "norms", "dw", "momentum")}
        )
        assert_states_close(one_row, truncated)
        # One decode step from the branch state gives the full forward's next output.
        if p + 1 < x["q"].shape[1]:
            t = p + 1
            o_t, _ = lact_swiglu_step(
                *(x[n][b : b + 1, t] for n in ("q", "k", "v", "lr0", "lr1", "lr2")), one_row,
                momentum=x["momentum"][b : b + 1, t], use_muon=True,
            )
            torch.testing.assert_close(o_t[0], o[b, t])


def test_states_after_are_differentiable():
    x = make_inputs(T=9)
    for t in x.values():
        t.requires_grad_()
    states = run_op(x, 4, True, False, True, output_states_after=True)[2](torch.tensor([[5], [8]]))
    loss = states.w0.square().sum() + states.k.sum() + states.dw[1].sum()
    grads = torch.autograd.grad(loss, [x["k"], x["v"], x["lr0"], x["w0"], x["momentum"]])
    assert all(g.abs().max() > 0 for g in grads)


def test_low_rank_initial_weights_get_gradients():
    x = make_inputs(T=9)
    g = torch.Generator().manual_seed(3)
    w_left = torch.randn(H, DH, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w_right = torch.randn(H, 3, D, generator=g, dtype=torch.float64, requires_grad=True)
    w0 = low_rank_fast_weight(w_left, w_right)
    torch.testing.assert_close(w0, w_left @ w_right + 0.5 * torch.eye(DH, D, dtype=torch.float64))
    o, _ = run_op({**x, "w0": w0}, 4, False, False, True)
    gl, gr = torch.autograd.grad(o.sum(), [w_left, w_right])
    assert gl.abs().max() > 0 and gr.abs().max() > 0


def test_newton_schulz_pushes_singular_values_towards_one():
    G = torch.randn(4, 12, 8, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert s.min() > 0.5 and s.max() < 1.5
    assert zeropower_via_newtonschulz5(G.bfloat16()).dtype == torch.float32  # always fp32 math


def test_per_sequence_initial_weights_equal_expanded_shared_ones():
    x = make_inputs(T=9)
    o, _ = run_op(x, 4, False, False, True)
    per_seq = {n: x[n].expand(B, *x[n].shape) for n in ("w0", "w1", "w2")}
    o2, _ = run_op({**x, **per_seq}, 4, False, False, True)
    torch.testing.assert_close(o, o2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: {"q": x["q"][0]}, r"q must have 4 dims"),
        (lambda x: {"v": x["v"][:, :-1]}, r"v has shape"),
        (lambda x: {"lr1": x["lr1"].clone().fill_(float("inf"))}, "lr1 contains NaN or Inf"),
        (lambda x: {"w1": x["w1"][:1]}, r"w1 has shape"),
        (lambda x: {"w0": x["w0"][..., :3]}, "do not match the head dim"),
    ],
)
def test_bad_input_raises_a_clear_error(change, message):
    x = make_inputs(T=6)
    with pytest.raises((ValueError, TypeError), match=message):
        run_op({**x, **change(x)}, 4, False, False, True)


def test_step_momentum_mismatch_raises():
    x = make_inputs(T=2)
    state = LaCTState.initial(x["w0"], x["w1"], x["w2"], B, 4, use_momentum=True)
    with pytest.raises(ValueError, match="momentum must be passed exactly when"):
        lact_swiglu_step(*(x[n][:, 0] for n in ("q", "k", "v", "lr0", "lr1", "lr2")), state)
