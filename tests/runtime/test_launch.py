"""The multi-process launcher and the parallel-layout checks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_refine.runtime import ParallelLayout, RankFailed, initialize, spawn


def _env():
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def _fail_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        raise KeyError("boom on rank one")
    return "ok"


def _die_on_rank_zero():
    if int(os.environ["RANK"]) == 0:
        os._exit(3)


def _hang_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        import time

        time.sleep(60)


def test_spawn_gives_each_rank_torchruns_environment():
    envs = spawn(_env, 3)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert len({e["MASTER_PORT"] for e in envs}) == 1


def test_the_rendezvous_port_is_free_and_outside_the_ephemeral_range():
    """Ports of outgoing connections come from the ephemeral range: a rendezvous port there can be taken between
    free_port and rank 0's bind (EADDRINUSE under pytest-xdist)."""
    import socket

    from megatron_refine.runtime.launch import EPHEMERAL_PORTS, free_port

    low = int(Path(EPHEMERAL_PORTS).read_text().split()[0]) if Path(EPHEMERAL_PORTS).exists() else 0
    if low <= 12_000:
        pytest.skip("needs Linux's ephemeral port range above 12000")
    for _ in range(20):
        port = free_port()
        assert 10_000 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of _fail_on_rank_one.*KeyError: 'boom on rank one'"):
        spawn(_fail_on_rank_one, 2)


def _data_error_on_every_rank():
    import time

    from megatron_refine.data.shards import DataError

    rank = int(os.environ["RANK"])
    if rank == 0:
        time.sleep(0.3)  # rank 1 reports first; rank 0's error is still the one raised
    raise DataError(f"bad shard on rank {rank}")


def test_a_failing_rank_carries_its_error_type_and_message():
    with pytest.raises(RankFailed) as failed:
        spawn(_fail_on_rank_one, 2)
    assert (failed.value.rank, failed.value.error_type, failed.value.error_message) == (1, "KeyError", "'boom on rank one'")
    assert "LookupError" in failed.value.error_bases
    with pytest.raises(RankFailed, match="(?s)rank 0 of _data_error_on_every_rank failed:.*bad shard on rank 0") as failed:
        spawn(_data_error_on_every_rank, 2)
    assert failed.value.error_type == "megatron_refine.data.shards.DataError"
    assert failed.value.error_message == "bad shard on rank 0" and "ValueError" in failed.value.error_bases


def test_a_dying_rank_is_reported():
    with pytest.raises(RankFailed, match="rank0 of _die_on_rank_zero died with exit code 3"):
        spawn(_die_on_rank_zero, 2)


def test_a_hanging_rank_times_out():
    with pytest.raises(RankFailed, match=r"timed out after 3s waiting for ranks \[1\]"):
        spawn(_hang_on_rank_one, 2, timeout=3)


# A launcher of two ranks that each wait for SIGTERM (writing their pids first), twice.
_LAUNCHER = """
import os, signal, sys, time
from megatron_refine.runtime import launch, spawn

launch.preload_modules = lambda: ("torch",)  # these ranks need no model: start faster

def until_sigterm(folder, round):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    path = os.path.join(folder, round + os.environ["RANK"])
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    while not stop:
        time.sleep(0.05)
    return "stopped"

if __name__ == "__main__":
    with open(os.path.join(sys.argv[1], "a.out"), "w") as f:
        f.write(repr(spawn(until_sigterm, 2, sys.argv[1], "a")))
    spawn(until_sigterm, 2, sys.argv[1], "b")
"""


def _rank_pids(folder, round, launcher, log):
    deadline = time.monotonic() + 120
    while not all((folder / f"{round}{rank}").exists() for rank in range(2)):
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return [int((folder / f"{round}{rank}").read_text()) for rank in range(2)]


def _running(pid):
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"  # a zombie has exited
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_sigterm_reaches_the_ranks_and_killing_the_launcher_ends_them(tmp_path):
    """Slurm's SIGTERM to the launcher is forwarded to the ranks (as torchrun does); kill -9 of the launcher takes
    its ranks with it instead of leaving them training and writing checkpoints."""
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        launcher = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path)], stderr=stderr)
    pids = []
    try:
        pids = _rank_pids(tmp_path, "a", launcher, log)
        launcher.send_signal(signal.SIGTERM)
        pids = _rank_pids(tmp_path, "b", launcher, log)  # the launcher lived on, its ranks returned
        assert (tmp_path / "a.out").read_text() == "['stopped', 'stopped']"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 5
        while any(map(_running, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, pids))
    finally:
        launcher.kill()
        launcher.wait()
        for pid in filter(_running, pids):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "world, tp, pp, cp, expected",
    [(4, 2, 1, 1, 2), (8, 2, 2, 1, 2), (4, 1, 1, 2, 2), (1, 1, 1, 1, 1)],
)
def test_layout_data_parallel_size(world, tp, pp, cp, expected):
    assert ParallelLayout(world, tp, pp, cp).data_parallel_size == expected


def test_layout_not_dividing_world_says_what_to_change():
    with pytest.raises(ValueError, match=r"tp x pp x cp = 3 x 1 x 1 = 3 does not divide the world size 4.*\[1, 2, 4\]"):
        ParallelLayout(4, 3)
    with pytest.raises(ValueError, match="must be a positive integer"):
        ParallelLayout(2, 0)


def _initialize_tp3():
    initialize(tp=3, device="cpu")


def test_initialize_rejects_an_invalid_layout_on_every_rank():
    with pytest.raises(RankFailed, match="does not divide the world size 2"):
        spawn(_initialize_tp3, 2)


def _tensors():
    import torch

    return {"weights": torch.arange(100_000, dtype=torch.float32), "rank": int(os.environ["RANK"])}


def test_tensor_results_survive_the_ranks_exiting():
    """Ranks exit right after reporting; their tensors must arrive intact (no shared-memory handles)."""
    for _ in range(5):
        results = spawn(_tensors, 2)
        assert [r["rank"] for r in results] == [0, 1]
        assert all(float(r["weights"][-1]) == 99_999.0 for r in results)


_PRELOAD_PROBE = """
import importlib, sys, torch
torch.cuda.is_available = lambda: True  # what a GPU host answers
from megatron_refine.runtime.launch import preload_modules
for name in preload_modules():
    importlib.import_module(name)
print(sorted(m for m in ("fla", "transformer_engine", "megatron.core.models.gpt") if m in sys.modules))
print(torch.cuda.is_initialized())
"""


def test_the_forkserver_on_a_cuda_host_imports_nothing_that_initialises_cuda():
    """fla initialises CUDA at import (fla/utils/hardware.py) and megatron-core's GPT stack imports fla: a
    forkserver that preloads them makes every forked rank fail at torch.cuda.set_device."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PRELOAD_PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "False"], out.stdout + out.stderr
    # The CPU preload does pull megatron-core's GPT stack in, which imports fla on megatron-core 0.16.1
    # (ssm/gated_delta_net.py) and Transformer Engine where it is installed.
    probe = _PRELOAD_PROBE.replace("lambda: True", "lambda: False")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "megatron.core.models.gpt" in out.stdout.split("\n")[0], out.stdout + out.stderr


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu'"):
        initialize(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA")
def test_a_cuda_runtime_without_cuda_says_to_use_the_cpu():
    with pytest.raises(ValueError, match="no CUDA.*use device='cpu'"):
        initialize(device="cuda")


def test_more_local_ranks_than_gpus_is_refused_with_the_fix(monkeypatch):
    """Two ranks on a 1-GPU host would share cuda:0, which NCCL refuses: say what to launch instead."""
    from megatron_refine.runtime.distributed import _cuda_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 ranks on this node but 1 GPU\(s\): start at most 1 .*device='cpu'"):
        _cuda_device(1)
