"""fla's own Triton kernels on a CPU, through Triton's interpreter: the harness of this folder's tests.

Triton reads TRITON_INTERPRET=1 when a kernel is defined (at fla's import), so these tests run in a pytest
session of their own, started with it set: tests/test_triton_interpreter.py does that from the main suite, or
alone: `TRITON_INTERPRET=1 .venv/bin/pytest tests/triton_interpreter`. Without it this folder collects nothing.

The interpreter runs fla 0.6's kernels with NumPy once two things are patched, in this process only:
- an autotuner benchmarks every config, which needs a GPU driver ("0 active drivers"): each keeps its first;
- `for i_t in range(NT)` inside a kernel gives Python ints, and fla's kernels call `i_t.to(tl.int64)`: fla's
  kernel modules get a `range` that yields Triton int32 scalars while a kernel runs (plain ints otherwise, so
  their host code and fla's naive references are untouched).
Inputs are fp16: bf16 gives wrong numbers under the interpreter (errors of 1e10 with fla 0.6 / Triton 3.9), and
the production path takes fp16 only there (`fla_available`). Shapes are tiny: every program is NumPy code.
"""

import builtins
import os
import sys
import threading

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
collect_ignore_glob = [] if INTERPRETING else ["test_*.py"]

_in_kernel = threading.local()


def _interpreter_range(*args):
    import triton.language as tl
    from triton.runtime.interpreter import _implicit_cvt

    bounds = builtins.range(*(int(a.handle.data.item()) if isinstance(a, tl.tensor) else a for a in args))
    return (_implicit_cvt(i) for i in bounds) if getattr(_in_kernel, "on", False) else bounds


def patch_triton_interpreter() -> None:
    """The two patches above, on fla's kernel modules loaded by the project's imports."""
    from triton.runtime import autotuner, interpreter

    import megatron_refine.kernels  # noqa: F401 - the kernels the project calls
    from megatron_refine.kernels.delta_rule.fla_path import fla_chunk_delta_rule, fla_chunk_gated_delta_rule

    if fla_chunk_delta_rule() is None or fla_chunk_gated_delta_rule() is None:
        raise RuntimeError("fla does not import: these tests run fla's kernels")
    tune = autotuner.Autotuner.run
    if not getattr(tune, "first_config_only", False):
        def first_config(self, *args, **kwargs):
            self.configs = self.configs[:1]
            return tune(self, *args, **kwargs)

        first_config.first_config_only = True
        autotuner.Autotuner.run = first_config

        launch = interpreter.GridExecutor.__call__

        def in_kernel(self, *args, **kwargs):
            _in_kernel.on = True
            try:
                return launch(self, *args, **kwargs)
            finally:
                _in_kernel.on = False

        interpreter.GridExecutor.__call__ = in_kernel
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None and not name.endswith(".naive"):
            module.range = _interpreter_range


@pytest.fixture(scope="session", autouse=True)
def triton_interpreter():
    patch_triton_interpreter()


@pytest.fixture(scope="session")
def megatron():
    """Megatron's parallel state on one CPU process (gloo), for the mixer and model tests."""
    from megatron_refine.runtime import destroy, initialize

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    runtime = initialize(seed=1, device="cpu")
    yield runtime
    destroy()


def assert_close_fp16(actual, expected, name: str = "", scale: float = 1.0) -> None:
    """fp16 kernels against the fp32 PyTorch path: within 2e-3 of the reference's largest entry (times scale)."""
    expected = expected.float()
    bound = 2e-3 * scale * max(expected.abs().max().item(), 1.0)
    err = (actual.float() - expected).abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
