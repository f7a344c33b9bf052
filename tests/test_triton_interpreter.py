"""fla's Triton kernels on this CPU: tests/triton_interpreter in a pytest session of its own, with Triton's
interpreter on (it must be set before triton defines fla's kernels). Alone: `pytest -m triton_interpreter`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton_interpreter


def test_fla_kernels_under_the_triton_interpreter():
    folder = Path(__file__).parent / "triton_interpreter"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"TRITON_INTERPRET=1 pytest {folder}:\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    assert " passed" in run.stdout.splitlines()[-1] and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]
