"""Stop a run cleanly on SIGTERM, as Megatron-LM's `--exit-signal-handler` does.

Slurm sends SIGTERM before a requeue or at the time limit (torchrun and `spawn` forward it to the ranks). The
handler only notes it; the training loop asks `received()` at the end of each step, a collective, so every
rank stops after the same step, saves the same checkpoint and returns, even when only some ranks got it.
"""

from __future__ import annotations

import os
import signal
import threading

import torch


class DistributedSignalHandler:
    """Within `with`: `sig` is noted instead of ending the process (outside the main thread, where Python cannot
    install handlers, nothing is noted and `received()` still takes part in the collective)."""

    def __init__(self, sig: int = signal.SIGTERM):
        self.sig, self._received, self._installed, self._previous = sig, False, False, None

    def __enter__(self) -> "DistributedSignalHandler":
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()
            self._previous, self._installed = signal.signal(self.sig, self._note), True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: a handler set outside Python, restored as the default
            signal.signal(self.sig, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _note(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a process forked meanwhile (a Manager serving checkpoint writes): just end
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._received = True

    @property
    def name(self) -> str:
        return signal.Signals(self.sig).name

    def received(self, device: torch.device) -> bool:
        """Whether any rank got the signal: every rank must call this at the same point."""
        flag = torch.tensor([int(self._received)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
