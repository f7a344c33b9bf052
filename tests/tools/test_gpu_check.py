"""tools/gpu_check.sh's dry run (no GPU, no network): the plan of each invocation, and the check of the carried
wheels against tools/gpu_setup.sh's pins, on a fake wheel folder of empty files with the right names."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET = 470  # gpu_check.sh's BUDGET: the step timeouts with their kill graces, inside 8 minutes


def _sh(*args, wheel_dir=None):
    env = {**os.environ, "PYTHON": sys.executable}
    if wheel_dir is not None:
        env["WHEEL_DIR"] = str(wheel_dir)
    return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _pins() -> list[tuple[str, str]]:
    out = _sh("tools/gpu_setup.sh", "packages").stdout.split()
    return [tuple(pin.split("==")) for pin in out]


def _wheel_name(name, version, tags="py3-none-any"):
    return f"{name.replace('-', '_')}-{version}-{tags}.whl"


@pytest.fixture
def wheels(tmp_path) -> Path:
    """Every pinned package once, as an empty wheel file of the name pip download gives it."""
    folder = tmp_path / "whl"
    folder.mkdir()
    for name, version in _pins():
        (folder / _wheel_name(name, version)).touch()
    return folder


def _plan(output: str) -> list[tuple[str, int, str]]:
    """(step, timeout in s, command) of each numbered line of the printed plan."""
    steps = re.findall(r"^\d+\. (\S+) +timeout +(\d+)s +(?:required|optional) +(.*)$", output, re.M)
    return [(name, int(t), command) for name, t, command in steps]


def test_the_pins_include_what_the_gpu_image_lacks():
    names = {name for name, _ in _pins()}
    assert {"megatron-core", "flash-linear-attention", "fla-core", "webdataset", "pytest", "pytest-timeout"} <= names


@pytest.mark.parametrize("mode, steps", [
    ("tests", ["nvidia-smi", "install", "pytest"]),
    ("bench", ["nvidia-smi", "install", "kernels", "layer", "refine", "model"]),
])
def test_the_dry_run_prints_every_step_with_its_timeout_within_the_budget(wheels, mode, steps):
    result = _sh("tools/gpu_check.sh", "--dry-run", mode, wheel_dir=wheels)
    assert result.returncode == 0, result.stderr
    plan = _plan(result.stdout)
    assert [name for name, _, _ in plan] == steps
    assert all(t > 0 and command for _, t, command in plan)
    assert sum(t + 5 for _, t, _ in plan) <= BUDGET
    assert f"{len(_pins())} wheels" in result.stdout
    if mode == "bench":  # every benchmark writes its figures for bench.json
        assert all("--json" in command for name, _, command in plan if name not in ("nvidia-smi", "install"))


def _missing(folder):
    next(folder.glob("megatron_core-*.whl")).unlink()


def _oversized(folder):
    os.truncate(next(folder.glob("fla_core-*.whl")), 65 * 2**20)  # sparse: no disk used


def _wrong_tag(folder):
    wheel = next(folder.glob("megatron_core-*.whl"))
    wheel.rename(folder / wheel.name.replace("py3-none-any", "cp311-cp311-manylinux_2_28_x86_64"))


def _duplicate(folder):
    (folder / _wheel_name("webdataset", "0.2.100")).touch()


def _other_version(folder):
    wheel = next(folder.glob("pytest-*.whl"))
    wheel.rename(folder / _wheel_name("pytest", "8.0.0"))


@pytest.mark.parametrize("break_it, message", [
    (None, r"^gpu_check: no \S+/ \(or no wheels in it\): run tools/gpu_setup.sh download"),
    (_missing, r"^gpu_check: megatron-core==\S+ missing from \S+/: run tools/gpu_setup.sh download$"),
    (_oversized, r"^gpu_check: \S+/ holds 6\d\.\d MiB, over the 64 MiB .*: drop a package"),
    (_wrong_tag, r"^gpu_check: megatron_core-\S+-cp311-cp311-\S+\.whl: not installable on CPython 3\.12 x86_64 "
                 r"Linux .*: remove it and run tools/gpu_setup.sh download$"),
    (_duplicate, r"^gpu_check: webdataset 2 times in \S+/ \(.*\): one version each.*run tools/gpu_setup.sh download$"),
    (_other_version, r"^gpu_check: pytest-8\.0\.0-py3-none-any\.whl: tools/gpu_setup.sh pins pytest==\S+: run "
                     r"tools/gpu_setup.sh download$"),
], ids=["no folder", "missing", "oversized", "wrong tag", "duplicate", "other version"])
def test_a_bad_wheel_folder_fails_with_one_line_naming_the_fix(wheels, tmp_path, break_it, message):
    if break_it is None:
        wheels = tmp_path / "absent"
    else:
        break_it(wheels)
    result = _sh("tools/gpu_check.sh", "--dry-run", "tests", wheel_dir=wheels)
    assert result.returncode != 0
    problems = [line for line in result.stderr.splitlines() if line.startswith("gpu_check:")]
    assert len(problems) == 1 and re.search(message, problems[0]), result.stderr


def test_the_tests_step_collects_the_cuda_only_tests():
    """The files the pytest step names exist and hold tests marked `cuda` (collected here, skipped on a CPU)."""
    plan = _plan(_sh("tools/gpu_check.sh", "--dry-run", "tests").stdout)
    command = next(command for name, _, command in plan if name == "pytest")
    files = [word for word in command.split() if word.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files)
    collected = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    count = int(re.search(r"(\d+)(?:/\d+)? tests? collected", collected.stdout).group(1))
    assert count > 0
