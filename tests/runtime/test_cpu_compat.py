"""The CPU compatibility patches: applied only without CUDA, reversible, and each one doing its job."""

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_refine.runtime import cpu_compat, initialize, spawn
from megatron_refine.runtime.cpu_compat import PATCHES, _resolve


def _current(target):
    owner, attr = _resolve(target)
    return getattr(owner, attr)


def test_apply_replaces_every_target_and_revert_restores_it():
    assert not cpu_compat.is_applied()
    originals = {p.target: _current(p.target) for p in PATCHES}
    with cpu_compat.applied():
        for p in PATCHES:
            assert _current(p.target) is not originals[p.target], p.target
        assert torch.cuda.current_device() == torch.device("cpu")
    for p in PATCHES:
        assert _current(p.target) is originals[p.target], p.target
    assert len({p.target for p in PATCHES}) == len(PATCHES)
    assert all(p.reason for p in PATCHES)


def test_nothing_is_patched_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    originals = {p.target: _current(p.target) for p in PATCHES}
    assert cpu_compat.apply() is False
    assert not cpu_compat.is_applied()
    for p in PATCHES:
        assert _current(p.target) is originals[p.target]


def test_clip_grad_by_total_norm_scales_grads_in_place():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = [p.grad.clone() for p in params]
    total = torch.nn.utils.get_total_norm(expected).item()
    scale = 0.5 / (total + 1e-6)
    with cpu_compat.applied():
        from megatron.core.optimizer import clip_grads

        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=0.5, total_norm=total)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e * scale)


def _rng_streams():
    rt = initialize(tp=2, seed=123)
    default = torch.randn(4)
    with get_cuda_rng_tracker().fork():
        model_parallel = torch.randn(4)
    after_fork = torch.randn(4)
    # Reseeding reproduces both streams; the fork left the default stream where it was.
    initialize(tp=2, seed=123)
    again = torch.randn(4)
    following = torch.randn(4)
    with get_cuda_rng_tracker().fork():
        model_parallel_again = torch.randn(4)
    assert torch.equal(default, again)
    assert torch.equal(after_fork, following)
    assert torch.equal(model_parallel, model_parallel_again)
    return rt.rank, parallel_state.get_tensor_model_parallel_rank(), default, model_parallel


def test_rng_tracker_gives_tensor_parallel_streams_on_cpu():
    (_, tp0, default0, mp0), (_, tp1, default1, mp1) = spawn(_rng_streams, 2)
    assert (tp0, tp1) == (0, 1)
    assert torch.equal(default0, default1)  # the data-parallel stream is shared across TP ranks
    assert not torch.equal(mp0, mp1)  # the tensor-parallel stream differs per TP rank
    assert not torch.equal(default0, mp0)
