"""Checkpoints move between the two megatron-core ends CI tests (0.16.1 on Python 3.11, 0.19.x on 3.12): a run
saved under one resumes under the other to the losses of the uninterrupted run, both ways, with the plain and the
distributed optimizer (the GPU default, in megatron-core's dp_reshardable format).

The other end's interpreter is MEGATRON_REFINE_PEER_PYTHON: CI's second leg (.ci/run) sets it to the first leg's
venv, so this runs once per CI run and covers both directions; without it the test skips.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_refine.megatron_compat import MEGATRON_CORE_VERSION

PEER = os.environ.get("MEGATRON_REFINE_PEER_PYTHON")
WORKER = Path(__file__).with_name("cross_version_worker.py")
OPTIMIZERS = {"optimizer": [], "distributed-optimizer": ["optimizer.use_distributed_optimizer=true"]}

if not PEER:
    pytest.skip("set MEGATRON_REFINE_PEER_PYTHON to the other megatron-core end's python (CI's second leg does)",
                allow_module_level=True)


def _jobs(python: str, jobs: list[dict]) -> dict:
    out = subprocess.run([python, str(WORKER), json.dumps(jobs)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{python} failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_checkpoint_resumes_under_the_other_megatron_core(corpus, tmp_path):
    job = lambda name, steps, load, extra: {"corpus": corpus, "root": str(tmp_path / name), "steps": steps,
                                            "load": load, "extra": extra}
    here_jobs, peer_jobs, back_jobs = [], [], []
    for name, extra in OPTIMIZERS.items():
        here_jobs += [job(f"{name}-full", 4, False, extra),
                      job(f"{name}-here", 4, False, [*extra, "exit_interval=2"])]  # saves after step 2, stops
        peer_jobs += [job(f"{name}-here", 4, True, extra),  # resumes this end's checkpoint
                      job(f"{name}-peer", 4, False, [*extra, "exit_interval=2"])]
        back_jobs += [job(f"{name}-peer", 4, True, extra)]  # resumes the other end's checkpoint here
    here = _jobs(sys.executable, here_jobs)
    peer = _jobs(PEER, peer_jobs)
    back = _jobs(sys.executable, back_jobs)
    assert here["megatron_core"] == str(MEGATRON_CORE_VERSION) != peer["megatron_core"]

    for i, name in enumerate(OPTIMIZERS):
        full, first_half = here["losses"][2 * i], here["losses"][2 * i + 1]
        resumed_there, peer_first_half = peer["losses"][2 * i], peer["losses"][2 * i + 1]
        resumed_here = back["losses"][i]
        assert len(first_half) == len(peer_first_half) == 2 and len(resumed_there) == len(resumed_here) == 2, name
        # Both ends train the same model from the same seed: the first steps agree across releases ...
        torch.testing.assert_close(torch.tensor(peer_first_half), torch.tensor(full[:2]), rtol=1e-5, atol=1e-6)
        # ... and each end's checkpoint resumes under the other to the uninterrupted run's losses.
        for resumed in (resumed_there, resumed_here):
            torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[2:]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
