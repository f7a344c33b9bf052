"""Packed sequences (cu_seqlens): every op computes, per sequence, what running that sequence alone computes
(outputs, final states, states after positions, gradients), and LaCT runs on exactly from a state."""

import pytest
import torch
import torch.nn.functional as F

from megatron_refine.kernels import delta_rule, lact_swiglu
from megatron_refine.kernels.varlen import ChunkLayout, prepare_position_ids, prepare_sequence_ids
from megatron_refine.models.common import causal_conv1d

H, K = 2, 8
LENGTHS = [5, 35, 1, 32, 17]  # one token, several chunks, an exact multiple of the chunk, a partial chunk
C = 16


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def split(x, lengths):
    return list(x[0].split(lengths))


def delta_inputs(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(rnd(1, total, H, K), dim=-1), F.normalize(rnd(1, total, H, K), dim=-1)
    return [q, k, rnd(1, total, H, K), torch.sigmoid(rnd(1, total, H))]


def test_layout_indices():
    cu_seqlens = cu([3, 5, 2])
    assert prepare_sequence_ids(cu_seqlens, 10).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert prepare_position_ids(cu_seqlens, 10).tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    layout = ChunkLayout.build(cu_seqlens, 2)
    assert layout.order.tolist() == [1, 0, 2] and layout.active == [3, 2, 1]
    assert layout.index[layout.valid].sort().values.tolist() == list(range(10))


def test_delta_rule_packed_equals_separate_runs():
    total = sum(LENGTHS)
    inputs = [x.requires_grad_() for x in delta_inputs(total)]
    h0 = torch.randn(len(LENGTHS), H, K, K, dtype=torch.float64, requires_grad=True)
    at = torch.tensor([[0, 4, 5, 20, 39, 40, 41, 72, 89]])
    o, final, states_after = delta_rule(*inputs, initial_state=h0, output_final_state=True, chunk_size=C,
                                        output_states_after=True, cu_seqlens=cu(LENGTHS))
    states = states_after(at)
    (o.square().sum() + final.sum() + states.sum()).backward()
    packed_grads = [x.grad.clone() for x in (*inputs, h0)]
    for x in (*inputs, h0):
        x.grad = None

    starts = cu(LENGTHS)[:-1].tolist()
    loss = 0
    for n, pieces in enumerate(zip(*(split(x, LENGTHS) for x in inputs))):
        o_n, f_n = delta_rule(*(p[None] for p in pieces), initial_state=h0[n : n + 1], output_final_state=True, chunk_size=C)
        torch.testing.assert_close(o_n[0], o[0, starts[n] : starts[n] + LENGTHS[n]])
        torch.testing.assert_close(f_n[0], final[n])
        mine = [(i, p - starts[n]) for i, p in enumerate(at[0].tolist()) if starts[n] <= p < starts[n] + LENGTHS[n]]
        if mine:
            rel = torch.tensor([[r for _, r in mine]])
            _, _, s_n = delta_rule(*(p[None] for p in pieces), initial_state=h0[n : n + 1], chunk_size=C,
                                   output_states_after=True)
            s_n = s_n(rel)
            torch.testing.assert_close(s_n[0], states[0, [i for i, _ in mine]])
            loss = loss + s_n.sum()
        loss = loss + o_n.square().sum() + f_n.sum()
    loss.backward()
    for packed, separate in zip(packed_grads, [x.grad for x in (*inputs, h0)]):
        torch.testing.assert_close(packed, separate)


def test_delta_rule_continues_from_a_state():
    q, k, v, beta = delta_inputs(40)
    o, _, states_after = delta_rule(q, k, v, beta, chunk_size=C, output_states_after=True)
    states = states_after(torch.tensor([[22]]))
    rest, _ = delta_rule(q[:, 23:], k[:, 23:], v[:, 23:], beta[:, 23:], initial_state=states[0], chunk_size=C)
    torch.testing.assert_close(rest, o[:, 23:])


def lact_inputs(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    D, DH = K, 12
    return dict(
        q=F.normalize(F.silu(rnd(1, total, H, D)), dim=-1), k=F.normalize(F.silu(rnd(1, total, H, D)), dim=-1),
        v=F.silu(rnd(1, total, H, D)), lr0=F.softplus(rnd(1, total, H) - 2), lr1=F.softplus(rnd(1, total, H) - 2),
        lr2=F.softplus(rnd(1, total, H) - 2), momentum=torch.sigmoid(rnd(1, total, H)),
        w0=rnd(H, DH, D) / D**0.5, w1=rnd(H, D, DH) / DH**0.5, w2=rnd(H, DH, D) / D**0.5,
    )


def run_lact(x, sl=slice(None), **kwargs):
    per_token = [x[n][:, sl] for n in ("q", "k", "v", "lr0", "lr1", "lr2")]
    return lact_swiglu(*per_token, x["w0"], x["w1"], x["w2"], chunk_size=8, momentum=x["momentum"][:, sl],
                       use_muon=True, **kwargs)


def test_lact_packed_equals_separate_runs():
    lengths = [3, 17, 8, 24, 1]
    x = lact_inputs(sum(lengths))
    for name in ("q", "k", "v", "w0", "w1"):
        x[name].requires_grad_()
    at = torch.tensor([[2, 3, 10, 19, 27, 28, 51]])
    o, final, states_after = run_lact(x, output_final_state=True, output_states_after=True, cu_seqlens=cu(lengths))
    states = states_after(at)
    (o.square().sum() + final.w0.sum() + states.w1.sum() + states.k.sum()).backward()
    packed_grads = [x[n].grad.clone() for n in ("q", "k", "v", "w0", "w1")]
    for n in ("q", "k", "v", "w0", "w1"):
        x[n].grad = None

    starts = cu(lengths)[:-1].tolist()
    loss = 0
    for n, (s, L) in enumerate(zip(starts, lengths)):
        o_n, f_n = run_lact(x, slice(s, s + L), output_final_state=True)
        torch.testing.assert_close(o_n[0], o[0, s : s + L])
        for field in ("w0", "w1", "w2", "k", "v", "lr", "length", "momentum"):
            torch.testing.assert_close(getattr(f_n, field)[0], getattr(final, field)[n])
        mine = [(i, p - s) for i, p in enumerate(at[0].tolist()) if s <= p < s + L]
        if mine:
            s_n = run_lact(x, slice(s, s + L), output_states_after=True)[2](torch.tensor([[r for _, r in mine]]))
            for field in ("w1", "k", "length", "dw"):
                mine_packed = getattr(states, field)
                got = getattr(s_n, field)
                if field == "dw":
                    mine_packed, got = mine_packed[0], got[0]
                torch.testing.assert_close(got, mine_packed[[i for i, _ in mine]])
            loss = loss + s_n.w1.sum() + s_n.k.sum()
        loss = loss + o_n.square().sum() + f_n.w0.sum()
    loss.backward()
    for packed, name in zip(packed_grads, ("q", "k", "v", "w0", "w1")):
        torch.testing.assert_close(packed, x[name].grad)


@pytest.mark.parametrize("split_at", [4, 7, 12])  # inside a chunk, at a chunk's last token, past a chunk
def test_lact_continues_from_a_state(split_at):
    x = lact_inputs(30)
    o, final, states_after = run_lact(x, output_final_state=True, output_states_after=True)
    states = states_after(torch.tensor([[split_at]]))
    rest = slice(split_at + 1, None)
    per_token = [x[n][:, rest] for n in ("q", "k", "v", "lr0", "lr1", "lr2")]
    o_rest, final_rest = lact_swiglu(*per_token, None, None, None, chunk_size=8, momentum=x["momentum"][:, rest],
                                     use_muon=True, initial_state=states, output_final_state=True)
    torch.testing.assert_close(o_rest, o[:, rest])
    for field in ("w0", "w1", "w2", "k", "length", "dw"):
        torch.testing.assert_close(getattr(final_rest, field), getattr(final, field))


def test_conv_packed_equals_separate_runs():
    lengths = [2, 7, 1, 5]
    x = torch.randn(1, sum(lengths), 6, dtype=torch.float64)
    weight = torch.randn(6, 4, dtype=torch.float64)
    y, _ = causal_conv1d(x, weight, cu_seqlens=cu(lengths))
    torch.testing.assert_close(torch.cat([causal_conv1d(p[None], weight)[0][0] for p in split(x, lengths)]), y[0])


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([0, 3, 3, 10]), "strictly increasing"),
    (torch.tensor([0, 3, 9]), "end at the total length 10"),
    (torch.tensor([[0, 10]]), "1-D"),
])
def test_bad_cu_seqlens_name_the_fix(bad, message):
    q, k, v, beta = delta_inputs(10)
    with pytest.raises((ValueError, TypeError), match=message):
        delta_rule(q, k, v, beta, cu_seqlens=bad)


def test_packed_inputs_need_batch_one():
    q, k, v, beta = (x.expand(2, *x.shape[1:]) for x in delta_inputs(10))
    with pytest.raises(ValueError, match=r"flatten the batch to \[1, B \* T\]"):
        delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 10]))
