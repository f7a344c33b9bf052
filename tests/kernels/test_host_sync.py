"""No host reads inside the layer loop: with the value checks off (their default on CUDA) the ops and decode
steps never read a tensor on the host, which on CUDA would stall the stream once per layer and step. A packed
layout reads its lengths once per `cu_seqlens` tensor. On CPU the host reads are counted with a
`TorchFunctionMode`; on CUDA (when there is one) `torch.cuda.set_sync_debug_mode("error")` checks the real thing.
"""

import collections
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from host_reads import HostReads

from megatron_refine.kernels import (
    LaCTState,
    delta_rule,
    delta_rule_step,
    get_debug_checks,
    lact_swiglu,
    lact_swiglu_step,
    set_debug_checks,
)
from megatron_refine.kernels import utils
from megatron_refine.kernels.utils import check_positions
from megatron_refine.kernels.varlen import ChunkLayout, batch_cu_seqlens, check_cu_seqlens, packed_layout
from megatron_refine.models.packing import Packing, packed_seq_params

@pytest.fixture
def checks():
    """Set the value-check mode for one test, restoring the previous one after."""
    before = get_debug_checks()
    yield set_debug_checks
    set_debug_checks(before)


def test_the_recorder_sees_every_kind_of_host_read():
    x, f = torch.tensor([2]), torch.tensor([0.5])
    reads = [lambda: x.item(), lambda: x.tolist(), lambda: bool(x), lambda: 1 if x else 0, lambda: int(x),
             lambda: [0, 1, 2][x], lambda: range(x), lambda: float(f), lambda: torch.arange(4)[torch.arange(4) > x],
             lambda: torch.nonzero(x), lambda: x.unique(), lambda: torch.arange(2).repeat_interleave(x.expand(2))]
    for read in reads:
        with HostReads() as seen:
            read()
        assert sum(seen.calls.values()) == 1, seen.calls
    with HostReads() as seen:
        torch.arange(3).repeat_interleave(torch.tensor([1, 0, 2]), output_size=3)
        x * 2 + x.sum()
    assert not seen.calls


H, K, D = 2, 8, 8


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def delta_inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(_rand(B, T, H, K, g=g), dim=-1) for _ in range(2))
    return q, k, _rand(B, T, H, K, g=g), torch.sigmoid(_rand(B, T, H, g=g))


def lact_inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(F.silu(_rand(B, T, H, D, g=g)), dim=-1) for _ in range(2))
    per_token = [q, k, F.silu(_rand(B, T, H, D, g=g))] + [F.softplus(_rand(B, T, H, g=g) - 2) for _ in range(3)]
    momentum = torch.sigmoid(_rand(B, T, H, g=g))
    weights = [_rand(H, 12, D, g=g) / D**0.5, _rand(H, D, 12, g=g) / 12**0.5, _rand(H, 12, D, g=g) / D**0.5]
    return per_token, momentum, weights


def _flat(x):
    return x.reshape(1, -1, *x.shape[2:])


def test_plain_batch_ops_and_decode_steps_read_nothing(checks):
    checks(False)
    q, k, v, beta = delta_inputs(2, 40)
    per_token, momentum, w = lact_inputs(2, 40)
    with HostReads() as seen:
        delta_rule(q, k, v, beta, use_reference=True, chunk_size=16, output_final_state=True)
        delta_rule(q, k, v, beta, use_reference=True, chunk_size=16, output_states_after=True)[2](
            torch.tensor([[3, 39], [0, 16]]))
        S = torch.zeros(2, H, K, K)
        for t in range(3):
            _, S = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], S)
        lact_swiglu(*per_token, *w, chunk_size=8, momentum=momentum, use_muon=True, output_final_state=True)
        state = LaCTState.initial(*w, 2, 4, use_momentum=True)
        for t in range(9):  # two chunks complete: their updates fire
            _, state = lact_swiglu_step(*(x[:, t] for x in per_token), state, momentum=momentum[:, t], use_muon=True)
    assert not seen.calls


def test_packed_ops_read_the_lengths_once_per_cu_seqlens(checks):
    checks(False)
    cu = torch.tensor([0, 5, 40, 41, 73, 80])
    q, k, v, beta = (_flat(x) for x in delta_inputs(2, 40))
    per_token, momentum, w = lact_inputs(2, 40)
    per_token, momentum = [_flat(x) for x in per_token], _flat(momentum)
    for first_call in (True, False):  # a forward's first layer builds the layouts, the next ones reuse them
        with HostReads() as seen:
            delta_rule(q, k, v, beta, use_reference=True, chunk_size=16, cu_seqlens=cu)
            lact_swiglu(*per_token, *w, chunk_size=8, momentum=momentum, cu_seqlens=cu)
        assert seen.calls == (collections.Counter(tolist=2) if first_call else collections.Counter()), seen.calls


def test_a_packed_layout_is_built_once_per_cu_seqlens_tensor(monkeypatch):
    builds = []
    build = ChunkLayout.build.__func__
    monkeypatch.setattr(ChunkLayout, "build", classmethod(lambda cls, *a: builds.append(a) or build(cls, *a)))
    cu = torch.tensor([0, 3, 11, 12])
    q, k, v, beta = (_flat(x) for x in delta_inputs(1, 12))
    outputs = [delta_rule(q, k, v, beta, chunk_size=4, cu_seqlens=cu)[0] for _ in range(3)]
    assert len(builds) == 1
    assert packed_layout(cu, 4) is packed_layout(cu, 4)
    assert packed_layout(cu.clone(), 4) is not packed_layout(cu, 4)  # same values, another tensor: built again
    assert packed_layout(cu, 2) is not packed_layout(cu, 4)
    layout = packed_layout(cu, 4)
    cu[1] = 5  # an in-place edit bumps the version: the cached layout is not reused
    assert packed_layout(cu, 4) is not layout and packed_layout(cu, 4).lengths == [5, 6, 1]
    torch.testing.assert_close(outputs[0], outputs[2])


@pytest.mark.parametrize("lengths", [[3, 5, 2], [4, 4, 4], [1], [9, 16, 7, 1]])
def test_packed_layout_scatter_inverts_gather_and_batch_layout_matches_build(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    layout = ChunkLayout.build(cu, 4)
    x = torch.arange(cu[-1].item() * 3, dtype=torch.float64).view(-1, 3)
    torch.testing.assert_close(layout.scatter(layout.gather(x), x.shape[0]), x)
    batch = ChunkLayout.for_batch(3, 10, 4, torch.device("cpu"))
    built = ChunkLayout.build(batch_cu_seqlens(3, 10, torch.device("cpu")), 4)
    for field in ("lengths", "active", "offsets", "uniform_length", "order", "rank", "first_pair", "cu_seqlens"):
        a, b = getattr(batch, field), getattr(built, field)
        assert (a.tolist() if isinstance(a, torch.Tensor) else a) == (b.tolist() if isinstance(b, torch.Tensor) else b)


def test_lact_states_after_and_decoding_from_them_read_once(checks):
    checks(False)
    per_token, momentum, w = lact_inputs(1, 20)
    with HostReads() as seen:  # which chunks' weights the positions need is data
        _, _, states_after = lact_swiglu(*per_token, *w, chunk_size=4, momentum=momentum, output_states_after=True)
        state = states_after(torch.tensor([[5, 9]]))
    assert seen.calls == collections.Counter(tolist=1)
    with HostReads() as seen:  # the states' partial-chunk lengths: read at the first step only
        for t in range(10, 17):  # both rows complete a chunk on the way
            _, state = lact_swiglu_step(*(x[:, t].expand(2, *x.shape[2:]) for x in per_token), state,
                                        momentum=momentum[:, t].expand(2, -1))
    assert seen.calls == collections.Counter(tolist=1)


def test_an_in_place_edit_of_the_length_is_seen(checks):
    per_token, momentum, w = lact_inputs(2, 1)
    C = 4
    state = LaCTState.initial(*w, 2, C)
    state.length.fill_(C - 1)  # in place: the remembered host lengths (zeros) no longer hold
    fresh = replace(state, length=state.length.clone())
    args = [x[:, 0] for x in per_token]
    _, after = lact_swiglu_step(*args, state)
    _, expected = lact_swiglu_step(*args, fresh)
    assert after.length.tolist() == expected.length.tolist() == [0, 0]
    torch.testing.assert_close(after.w0, expected.w0)


def test_the_switch_turns_the_value_checks_on_and_off(checks):
    q, k, v, beta = delta_inputs(1, 10)
    nan_beta = beta.clone().fill_(float("nan"))
    checks(False)
    assert delta_rule(q, k, v, nan_beta)[0].isnan().all()
    assert delta_rule_step(q[:, 0], k[:, 0], v[:, 0], nan_beta[:, 0], torch.zeros(1, H, K, K))[0].isnan().all()
    check_cu_seqlens(torch.tensor([0, 3, 3, 10]), 1, 10)
    check_positions(torch.tensor([[10]]), 1, 10)
    for mode in (None, True):  # the default runs them on CPU tensors
        checks(mode)
        with pytest.raises(ValueError, match="beta contains NaN or Inf"):
            delta_rule(q, k, v, nan_beta)
        with pytest.raises(ValueError, match="beta contains NaN or Inf"):
            delta_rule_step(q[:, 0], k[:, 0], v[:, 0], nan_beta[:, 0], torch.zeros(1, H, K, K))
        with pytest.raises(ValueError, match="strictly increasing"):
            delta_rule(q, k, v, beta, cu_seqlens=torch.tensor([0, 3, 3, 10]))
        with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
            delta_rule(q, k, v, beta, output_states_after=True)[2](torch.tensor([[10]]))
        per_token, momentum, w = lact_inputs(1, 6)
        per_token[4] = per_token[4].clone().fill_(float("inf"))
        with pytest.raises(ValueError, match="lr1 contains NaN or Inf"):
            lact_swiglu(*per_token, *w, chunk_size=4)


@pytest.mark.parametrize("value, mode", [("", None), ("1", True), ("0", False), ("auto", None)])
def test_the_switch_reads_its_environment_variable(monkeypatch, value, mode):
    monkeypatch.setenv(utils.DEBUG_CHECKS_ENV, value)
    assert utils._mode_from_env() is mode


def test_by_default_the_value_checks_skip_tensors_off_the_cpu(checks):
    """Meta tensors stand in for CUDA here: any read of their values raises."""
    q, k, v, beta = (x[:, 0].to("meta") for x in delta_inputs(1, 1))
    state = torch.zeros(1, H, K, K, device="meta")
    checks(None)
    o, _ = delta_rule_step(q, k, v, beta, state)
    assert o.device.type == "meta"
    checks(True)
    with pytest.raises((RuntimeError, NotImplementedError)):
        delta_rule_step(q, k, v, beta, state)


def test_packing_validates_the_document_starts_once_per_forward():
    params = packed_seq_params(torch.tensor([0, 5, 47, 80]))
    with HostReads() as seen:
        packing = Packing.from_params(params, 2, 40)
        assert Packing.from_params(params, 2, 40) is packing
    assert seen.calls == collections.Counter(tolist=1)
    assert packing.cu_seqlens.tolist() == [0, 5, 40, 47, 80]
    with pytest.raises(ValueError, match="strictly increasing"):
        Packing.from_params(packed_seq_params(torch.tensor([0, 47, 5, 80])), 2, 40)
    with pytest.raises(ValueError, match="must run from 0 to the micro-batch's 2 x 40 tokens"):
        Packing.from_params(packed_seq_params(torch.tensor([0, 5, 79])), 2, 40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_stream_sync_in_bf16_forward_and_decode_step_on_cuda():
    """fla's kernel (or the PyTorch path), LaCT's chunked forward and both decode steps, plain and packed, after a
    warm-up (Triton autotuning, the packed layouts): under sync debug mode "error" any host sync raises."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    q, k, v, beta = (x.to(cuda, bf16) for x in delta_inputs(2, 64))
    per_token, momentum, w = lact_inputs(2, 64)
    per_token, momentum, w = [x.to(cuda, bf16) for x in per_token], momentum.to(cuda, bf16), [x.to(cuda) for x in w]
    cu = torch.tensor([0, 17, 64, 100, 128], device=cuda)

    def forward_and_steps():
        delta_rule(q, k, v, beta)
        delta_rule(*(_flat(x) for x in (q, k, v, beta)), cu_seqlens=cu, use_reference=True)
        delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], torch.zeros(2, H, K, K, device=cuda))
        lact_swiglu(*per_token, *w, chunk_size=16, momentum=momentum)
        lact_swiglu(*(_flat(x) for x in per_token), *w, chunk_size=16, momentum=_flat(momentum), cu_seqlens=cu)
        state = LaCTState.initial(*w, 2, 2, use_momentum=True)
        for t in range(3):
            _, state = lact_swiglu_step(*(x[:, t] for x in per_token), state, momentum=momentum[:, t])

    forward_and_steps()
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_and_steps()
    finally:
        torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()
