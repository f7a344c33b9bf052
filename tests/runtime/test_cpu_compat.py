"""The CPU compatibility patches: applied for a CPU runtime only, reversible, and each one doing its job."""

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_refine.runtime import cpu_compat, initialize, spawn
from megatron_refine.runtime.cpu_compat import PATCHES, _resolve, active_patches


def _current(target):
    owner, attr = _resolve(target)
    return getattr(owner, attr)


def test_apply_replaces_every_target_and_revert_restores_it():
    assert not cpu_compat.is_applied()
    patches = [p for p in active_patches() if p in PATCHES]
    originals = {p.target: _current(p.target) for p in patches}
    with cpu_compat.applied():
        for p in patches:
            assert _current(p.target) is not originals[p.target], p.target
        assert torch.cuda.current_device() == torch.device("cpu")
    for p in patches:
        assert _current(p.target) is originals[p.target], p.target
    assert len({p.target for p in PATCHES}) == len(PATCHES)
    assert all(p.reason for p in PATCHES)


def test_a_patch_applies_exactly_where_the_installed_megatron_core_has_its_target():
    """`since` is right both ways: each patch left out lacks its target here (so nothing is silently unpatched),
    and each one applied has it."""
    def present(target):
        try:
            owner, attr = _resolve(target)
        except AttributeError:  # a parent of the attribute is missing
            return False
        return hasattr(owner, attr)

    for p in (*PATCHES, *cpu_compat.LOCAL_KERNELS):
        assert present(p.target) == p.applies, (p.target, p.since)


def test_the_cuda_stream_megatron_waits_on_is_the_cpu_stream():
    """megatron-core 0.19's gradient reduction waits on torch.cuda.current_stream(); a CUDA build without a GPU
    raises there, a CPU build too."""
    with cpu_compat.applied():
        stream = torch.cuda.current_stream()
        stream.wait_stream(stream)
        stream.wait_event(torch.Event())
    assert isinstance(stream, torch.cpu.Stream)


def _patched_during_a_cpu_runtime():
    from megatron_refine.runtime import current_device, destroy

    originals = {p.target: _current(p.target) for p in active_patches()}
    initialize(device="cpu")
    applied = cpu_compat.is_applied() and current_device() == torch.device("cpu")
    destroy()
    restored = all(_current(p.target) is originals[p.target] for p in active_patches())
    return applied, restored, cpu_compat.is_applied()


def test_a_cpu_runtime_applies_the_patches_and_destroy_reverts_them():
    """So a process (a test rank on a GPU host) that ran a CPU runtime can run the stock CUDA path after it."""
    assert spawn(_patched_during_a_cpu_runtime, 1) == [(True, True, False)]


def test_the_optimizers_see_cpu_parameters_by_their_cuda_type_names():
    seen = []
    wrapped = cpu_compat._with_cuda_literals_on_cpu(lambda *ts: seen.extend(t.type() for t in ts))
    wrapped(torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16))
    assert seen == ["torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor"]
    assert torch.zeros(1).type() == "torch.FloatTensor"  # only inside the patched functions


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
    rt = initialize(tp=2, seed=123, device="cpu")
    default = torch.randn(4)
    with get_cuda_rng_tracker().fork():
        model_parallel = torch.randn(4)
    after_fork = torch.randn(4)
    # Reseeding reproduces both streams; the fork left the default stream where it was.
    initialize(tp=2, seed=123, device="cpu")
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


def test_a_cpu_runtime_uses_megatrons_torch_optimizer_and_kernels_even_where_te_or_apex_is_installed():
    from megatron.core import optimizer, utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer

    originals = {p.target: _current(p.target) for p in cpu_compat.LOCAL_KERNELS}
    with cpu_compat.applied():
        assert optimizer.USING_PYTORCH_OPTIMIZER and not distrib_optimizer.HAVE_APEX_OR_TE
        assert clip_grads.multi_tensor_applier is utils.local_multi_tensor_applier
        assert clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
        assert optimizer.optimizer.multi_tensor_scale_impl is utils.local_multi_tensor_scale
    assert all(_current(p.target) is originals[p.target] for p in cpu_compat.LOCAL_KERNELS)
