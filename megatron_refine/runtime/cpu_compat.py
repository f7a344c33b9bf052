"""megatron-core on hosts without CUDA: the few patches that let it run on gloo.

megatron-core 0.16.1 has no CPU path. Its collectives work on gloo, but it allocates buffers on
`torch.cuda.current_device()` or on a literal ``device="cuda"``, synchronizes CUDA streams, and keeps its
RNG states in the CUDA generator. On a CPU build of torch each of those raises. The patches below turn
exactly those calls into their CPU equivalents and nothing else. `initialize(device="cpu")` applies them (the
default device on a host without CUDA) and `destroy()` reverts them; a CUDA runtime never applies them, so on
GPU the stock Megatron path runs untouched.

Every patch names the Megatron code it serves and why; `PATCHES` lists them and tests cover each one
(tests/runtime/test_cpu_compat.py). When a megatron-core upgrade makes a patch unnecessary, delete it here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from packaging.version import Version
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Patch:
    target: str  # "module:attr.path" that is replaced
    reason: str
    make: Callable[[Any], Any]  # original -> replacement
    since: str | None = None  # the first megatron-core release that has the target (None: every supported one)

    @property
    def applies(self) -> bool:
        # imported here: megatron_compat imports megatron-core's GDN module, which on 0.16.1 imports fla, which
        # probes the GPU; the launcher imports this module before forking ranks
        from megatron_refine.megatron_compat import MEGATRON_CORE_VERSION

        return self.since is None or MEGATRON_CORE_VERSION >= Version(self.since)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_current_stream(device=None) -> torch.cpu.Stream:
    return torch.cpu.current_stream()


def _noop(*args, **kwargs) -> None:
    return None


class _CudaLiteralsOnCpu(TorchFunctionMode):
    """Inside a few Megatron functions, map ``device="cuda"`` allocations and ``Tensor.cuda()`` to CPU, and
    report CPU tensors' ``type()`` by their CUDA names (the optimizers sort parameters by
    ``param.type() == 'torch.cuda.FloatTensor'`` and refuse anything else)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def _with_cuda_literals_on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaLiteralsOnCpu():
            return fn(*args, **kwargs)

    return wrapper


def _get_cpu_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _tracker_add_cpu(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add with the CPU generator: same seed bookkeeping, CPU state."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _tracker_fork_cpu(self, name: str = "model-parallel-rng"):
    """CudaRNGStatesTracker.fork on the CPU generator, without its "CPU RNG state changed" check: on CPU
    the tracked stream is the CPU generator, so the check would fire on every fork."""
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the desired state name {name}")
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(self.states_[orig_name] if orig_name != "default-rng" else orig_state)
        self._current_state_name = orig_name


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """clip_grads.clip_grad_by_total_norm_fp32 without its `grad.type() == 'torch.cuda.FloatTensor'` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    if any(g.dtype not in (torch.float32, torch.bfloat16) for g in grads):
        raise TypeError("clip_grad_by_total_norm_fp32 expects fp32 (or bf16 decoupled) gradients")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


_RANDOM = "megatron.core.tensor_parallel.random"
_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
_OPTIMIZER = "megatron.core.optimizer.optimizer"
_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer"
_CLIP_GRADS = "megatron.core.optimizer.clip_grads"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "torch.cuda:current_device",
        "megatron-core allocates on torch.cuda.current_device() in the sequence-parallel gathers and "
        "reduce-scatters (tensor_parallel.mappings._gather_along_first_dim, "
        "_reduce_scatter_along_first_dim), the global memory buffer (utils.GlobalMemoryBuffer.get_tensor, "
        "used by LinearWithGradAccumulationAndAsyncCommunication under SP), the DDP grad buffers "
        "(distributed.param_and_grad_buffer._ParamAndGradBuffer) and dist_checkpointing; a CPU build raises.",
        lambda orig: _cpu_current_device,
    ),
    Patch(
        "torch.cuda:synchronize",
        "dist_checkpointing.strategies (filesystem_async, async_utils, fully_parallel) and "
        "DistributedDataParallel.offload_grad_buffers synchronize CUDA streams; nothing to wait for on CPU.",
        lambda orig: _noop,
    ),
    Patch(
        "torch.cuda:current_stream",
        "megatron-core 0.19's _ParamAndGradBucketGroup.start_grad_sync waits on CUDA-graph events through "
        "torch.cuda.current_stream() before every gradient reduction; the CPU stream's waits are no-ops.",
        lambda orig: _cpu_current_stream,
    ),
    Patch(
        f"{_RANDOM}:_get_cuda_rng_state",
        "activation recompute (CheckpointFunction) and get_all_rng_states read the CUDA generator; "
        "on CPU the tracked state is the CPU generator's.",
        lambda orig: _get_cpu_rng_state,
    ),
    Patch(
        f"{_RANDOM}:_set_cuda_rng_state",
        "Counterpart of _get_cuda_rng_state: restores the CPU generator.",
        lambda orig: _set_cpu_rng_state,
    ),
    Patch(
        f"{_RANDOM}:CudaRNGStatesTracker.add",
        "model_parallel_cuda_manual_seed registers the data-, tensor- and expert-parallel seeds with "
        "torch.cuda.get_rng_state(); on CPU each seed gets a CPU generator state.",
        lambda orig: _tracker_add_cpu,
    ),
    Patch(
        f"{_RANDOM}:CudaRNGStatesTracker.fork",
        "forks the CUDA generator and warns when the CPU generator moved inside the fork; on CPU the "
        "tracked stream is the CPU generator itself.",
        lambda orig: _tracker_fork_cpu,
    ),
    Patch(
        f"{_OPTIMIZER}:FP32Optimizer.__init__",
        "allocates its loss scale with device='cuda' (a literal the current_device patch cannot reach).",
        _with_cuda_literals_on_cpu,
    ),
    Patch(
        f"{_OPTIMIZER}:MegatronOptimizer.has_grad_norm_group",
        "megatron-core 0.19 all-reduces a flag allocated with device='cuda' the first time each optimizer step "
        "asks whether any rank holds a separate gradient-norm group.",
        _with_cuda_literals_on_cpu,
        since="0.19",
    ),
    Patch(
        f"{_OPTIMIZER}:MixedPrecisionOptimizer.__init__",
        "allocates found_inf and the loss-scale constants with device='cuda'.",
        _with_cuda_literals_on_cpu,
    ),
    Patch(
        f"{_OPTIMIZER}:Float16OptimizerWithFloat16Params.__init__",
        "keeps fp32 main copies only of parameters whose type() is 'torch.cuda.BFloat16Tensor' / "
        "'torch.cuda.HalfTensor' and raises for any other (a CPU parameter is 'torch.BFloat16Tensor').",
        _with_cuda_literals_on_cpu,
    ),
    Patch(
        f"{_DISTRIB_OPTIMIZER}:DistributedOptimizer.__init__",
        "sorts its shards by param.type() == 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' (raises "
        "for CPU types) and allocates with device='cuda'.",
        _with_cuda_literals_on_cpu,
    ),
    *(
        Patch(
            f"{_SCHEDULES}:{name}",
            "allocates its token counter with device='cuda' (get_forward_backward_func returns it by name).",
            _with_cuda_literals_on_cpu,
        )
        for name in (
            "forward_backward_no_pipelining",
            "forward_backward_pipelining_without_interleaving",
            "forward_backward_pipelining_with_interleaving",
        )
    ),
    # clip_grads functions are patched where they are defined and where the optimizer imported them.
    *(
        Patch(
            f"{module}:{name}",
            f"clip_grads.{name} allocates its norm and zero-count buffers with device='cuda'.",
            _with_cuda_literals_on_cpu,
        )
        for name in ("get_grad_norm_fp32", "count_zeros_fp32")
        for module in (_CLIP_GRADS, _OPTIMIZER)
    ),
    *(
        Patch(
            f"{module}:clip_grad_by_total_norm_fp32",
            "asserts every grad is a 'torch.cuda.FloatTensor' and allocates its overflow flag on 'cuda'.",
            lambda orig: _clip_grad_by_total_norm_fp32_cpu,
        )
        for module in (_CLIP_GRADS, _OPTIMIZER)
    ),
)


def _local(name: str) -> Callable[[Any], Any]:
    return lambda orig: getattr(importlib.import_module("megatron.core.utils"), name)


def _value(value: Any) -> Callable[[Any], Any]:
    return lambda orig: value


# With Transformer Engine or apex installed (a GPU host running the CPU tests), megatron-core binds their fused
# CUDA optimizers and multi-tensor kernels at import; a CPU runtime needs its own torch fallbacks, which it
# binds when neither is installed. On such a host these set what is there already.
LOCAL_KERNELS: tuple[Patch, ...] = (
    Patch("megatron.core.optimizer:USING_PYTORCH_OPTIMIZER",
          "get_megatron_optimizer builds TE's / apex's FusedAdam (CUDA only) unless this is set.", _value(True)),
    *(Patch(f"{_DISTRIB_OPTIMIZER}:{flag}", "DistributedOptimizer reads the step from torch Adam's state "
            "(not a fused Adam's param groups) when these say no fused optimizer is in use.", _value(value))
      for flag, value in (("HAVE_APEX_OR_TE", False), ("USING_TE_OPTIMIZER", False), ("USING_APEX_OPTIMIZER", False))),
    *(Patch(f"{module}:{name}", f"{module.rsplit('.', 1)[1]}.py binds TE's / apex's CUDA multi-tensor kernel.",
            _local(local))
      for module in (_CLIP_GRADS, _OPTIMIZER)
      for name, local in (("multi_tensor_applier", "local_multi_tensor_applier"),
                          ("l2_norm_impl", "local_multi_tensor_l2_norm"),
                          ("multi_tensor_scale_impl", "local_multi_tensor_scale"))
      if module == _CLIP_GRADS or name != "l2_norm_impl"),
)

_originals: dict[str, Any] = {}


def _resolve(target: str) -> tuple[Any, str]:
    module_name, attr_path = target.split(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, attr


def is_applied() -> bool:
    return bool(_originals)


def active_patches() -> tuple[Patch, ...]:
    """The patches whose targets exist in the installed megatron-core."""
    return tuple(p for p in (*PATCHES, *LOCAL_KERNELS) if p.applies)


def apply() -> None:
    """Apply every patch (idempotent). For a process whose Megatron tensors all live on the CPU."""
    if is_applied():
        return
    for patch in active_patches():
        owner, attr = _resolve(patch.target)
        original = getattr(owner, attr)
        _originals[patch.target] = original
        setattr(owner, attr, patch.make(original))


def revert() -> None:
    """Restore megatron-core and torch exactly as shipped."""
    for target, original in reversed(list(_originals.items())):
        owner, attr = _resolve(target)
        setattr(owner, attr, original)
    _originals.clear()


@contextlib.contextmanager
def applied():
    """Context manager form, for tests: the patches hold inside the block only."""
    was_applied = is_applied()
    apply()
    try:
        yield
    finally:
        if not was_applied:
            revert()
