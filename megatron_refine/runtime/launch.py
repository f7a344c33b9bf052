"""Run a function on N local ranks with torchrun's environment: the tests' and the demo's launcher.

`spawn(fn, nprocs)` starts N processes (from a forkserver that has torch and megatron-core imported once,
so each rank starts in well under a second), gives each RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT on a free local port, runs `fn(*args, **kwargs)` and returns the per-rank results. A failing
rank's error is re-raised in the caller as `RankFailed` (its traceback, type and message; rank 0's when
ranks fail together); a rank that hangs past `timeout` stops all of them.
Ranks die with the launcher (`kill -9` of it included), and a SIGTERM to the launcher (Slurm's, before a requeue or
at the time limit) is forwarded to them, as torchrun does: training saves at the end of its step and returns.
Multi-node runs use torchrun (or the NeMo-Run recipes) directly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import random
import signal
import socket
import threading
import time
import traceback
from typing import Any, Callable

# Imported once in the forkserver, so every rank starts with them loaded (megatron_refine.models alone pulls
# in megatron-core's GPT stack, fla and triton: several seconds per fresh interpreter).
PRELOAD_CPU = (
    "megatron_refine.forkserver_filters",
    "torch",
    "megatron_refine.runtime",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "megatron_refine.models",
    "megatron_refine.data",
    "megatron_refine.training",
)
# On a CUDA host the forkserver must not initialise CUDA, or every rank forked from it fails at
# torch.cuda.set_device ("Cannot re-initialize CUDA in forked subprocess"). fla initialises it at import
# (fla/utils/hardware.py asks torch.cuda for the device name), and megatron-core imports fla
# (megatron/core/ssm/gated_delta_net.py) and Transformer Engine, which probes the GPU too; so only torch,
# whose CUDA initialisation is lazy, is preloaded there, and each rank imports the rest itself.
PRELOAD_CUDA = ("megatron_refine.forkserver_filters", "torch")


# How long to wait for rank 0's report after another rank failed: ranks that fail on the same bad input do
# so within moments of each other, and rank 0's is the one a user expects to read.
RANK0_GRACE_S = 1.0


class RankFailed(RuntimeError):
    """A rank raised, died or timed out; the message (`args[0]`) carries its traceback.

    When the rank raised, `rank`, `error_type` (qualified name, e.g. 'megatron_refine.data.shards.DataError'
    or 'ValueError'), `error_message` (`str()` of the exception) and `error_bases` (the qualified names of
    its class and all its bases: DataError's include 'ValueError') describe it; None (and ()) when the rank
    died or timed out.
    """

    def __init__(self, message: str, rank: int | None = None, error_type: str | None = None,
                 error_message: str | None = None, error_bases: tuple[str, ...] = ()):
        super().__init__(message)
        self.rank = rank
        self.error_type = error_type
        self.error_message = error_message
        self.error_bases = error_bases


def _qualified_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


def free_port() -> int:
    """A free local port for the ranks' rendezvous (rank 0's TCPStore binds it a moment later). Drawn below Linux's
    ephemeral range: a port from there (what binding port 0 gives) can be taken in between by any outgoing connection,
    such as the gloo pairs of a spawn running beside this one (pytest-xdist), and rank 0 then fails with EADDRINUSE.
    Elsewhere, or when that range leaves no room below it, the kernel's pick."""
    try:
        with open(EPHEMERAL_PORTS) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = [random.SystemRandom().randrange(10_000, low) for _ in range(64)] if low > 12_000 else []
    for port in candidates + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free local TCP port for the ranks' rendezvous")  # port 0 failed too


def preload_modules() -> tuple[str, ...]:
    """What the forkserver imports before forking ranks on this host."""
    import torch

    return PRELOAD_CUDA if torch.cuda.is_available() else PRELOAD_CPU


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload_modules()))
    return ctx


def _exit_with_launcher(alive) -> None:
    """Block on the launcher's end of a pipe; when it closes (the launcher exited or was killed), end this rank.
    A rank's parent is the forkserver, which the ranks themselves keep alive, so PR_SET_PDEATHSIG would never fire."""
    try:
        alive.recv()
    except (EOFError, OSError):
        pass
    for child in mp.active_children():  # e.g. the Manager that serves checkpoint writes: it would outlive us
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _run_rank(fn, rank, nprocs, port, threads, alive, args, kwargs, results) -> None:
    threading.Thread(target=_exit_with_launcher, args=(alive,), name="exit-with-launcher", daemon=True).start()
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    # A CUDA build of torch on a host without a GPU: fla's import-time probe (torch.cuda.get_device_name) fails,
    # but it registers the fork handler first, so every forked rank is marked "bad fork". Harmless there:
    # with no GPU the rank runs on the CPU and never initialises CUDA.
    if torch.cuda._is_in_bad_fork() and torch.cuda.is_available():
        results.put((rank, False, {"traceback": "CUDA was initialised in the launcher's forkserver before this rank "
                                                "was forked: a module in PRELOAD_CUDA (megatron_refine/runtime/launch.py) "
                                                "touches the GPU at import"}))
        return
    from megatron_refine.runtime import distributed
    from megatron_refine.warnings import filter_library_warnings

    filter_library_warnings()  # a forkserver started before the caller's filters does not have them
    torch.set_num_threads(threads)
    try:
        # Plain pickle bytes: torch's queue reducers would hand tensors over as shared-memory file
        # descriptors, which the parent cannot fetch once this process has exited.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, {"traceback": traceback.format_exc(), "type": _qualified_name(type(e)),
                                   "message": str(e), "bases": tuple(map(_qualified_name, type(e).__mro__))}))
    finally:
        distributed.destroy()


def _failure(fn, rank: int, report: dict) -> RankFailed:
    return RankFailed(f"rank {rank} of {fn.__name__} failed:\n{report['traceback']}", rank, report.get("type"),
                      report.get("message"), report.get("bases", ()))


def _rank0_failure(fn, results) -> RankFailed | None:
    """Rank 0's failure, if it reports one within RANK0_GRACE_S (ranks often fail together on the same input)."""
    deadline = time.monotonic() + RANK0_GRACE_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            rank, ok, value = results.get(timeout=left)
        except queue.Empty:
            return None
        if rank == 0:
            return None if ok else _failure(fn, rank, value)
    return None


def spawn(
    fn: Callable[..., Any],
    nprocs: int = 2,
    *args: Any,
    timeout: float = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `nprocs` local ranks and return their results, ordered by rank.

    `fn` must be picklable (a module-level function). Each rank gets an equal share of the CPU threads.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    alive, launcher_alive = ctx.Pipe(duplex=False)  # only this process holds the write end: EOF = it is gone
    procs = [
        ctx.Process(
            target=_run_rank,
            args=(fn, rank, nprocs, port, threads, alive, args, kwargs, results),
            name=f"rank{rank}",
        )
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    alive.close()
    forward = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    if forward:
        def to_ranks(signum, frame):
            for p in procs:
                if p.exitcode is None:
                    os.kill(p.pid, signum)

        previous = signal.signal(signal.SIGTERM, to_ranks) or signal.SIG_DFL

    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < nprocs:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    code = dead[0].exitcode
                    raise RankFailed(
                        f"{dead[0].name} of {fn.__name__} died with exit code {code}"
                        + (f" ({signal.Signals(-code).name})" if -code in signal.valid_signals() else "")
                        + " before reporting (killed, out of memory or a crash in native code)"
                    ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(nprocs)) - set(outputs))
                    raise RankFailed(
                        f"{fn.__name__} timed out after {timeout:.0f}s waiting for ranks {missing} "
                        "(a collective that not every rank entered?)"
                    ) from None
                continue
            if not ok:
                failure = _failure(fn, rank, value)
                if rank != 0 and 0 not in outputs:
                    failure = _rank0_failure(fn, results) or failure
                raise failure
            outputs[rank] = pickle.loads(value)
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)
        for p in procs:
            p.join(timeout=10.0 if len(outputs) == nprocs else 0.0)
            if p.is_alive():
                p.kill()
                p.join()
        launcher_alive.close()
    return [outputs[r] for r in range(nprocs)]
