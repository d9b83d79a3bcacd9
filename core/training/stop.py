"""Stop requests: a signal asks the training loop to checkpoint at the next agreed step boundary.

Two kinds, because they end differently:
- PREEMPT (SIGUSR2): Slurm's warning before the time limit or a preemption; the job checkpoints
  and is requeued, and the next attempt resumes.
- STOP (SIGTERM from ``scancel`` or the submit command, SIGINT from Ctrl-C): the user wants the
  job to end; it checkpoints and stops, to be continued by hand with ``--resume``.

This module imports nothing heavy (torch is imported only when ranks agree), so a task installs
its handlers first thing, before torch loads: a signal that arrives early is still a clean stop,
never Python's default action (USR2 would kill the task with exit 140).
"""

from __future__ import annotations

import signal
import sys

NONE, STOP, PREEMPT = 0, 1, 2
KIND_NAMES = {NONE: "none", STOP: "stop", PREEMPT: "preempt"}


class StopRequest:
    """Set by a signal; polled by the training loop at step boundaries."""

    def __init__(self) -> None:
        self.kind = NONE
        self.signal_name: str | None = None
        self.agreed_kind = NONE
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.kind != NONE

    def request(self, kind: int, name: str = "request") -> None:
        if kind > self.kind:
            self.kind, self.signal_name = kind, name

    def install(self) -> None:
        """USR2 preempts; TERM and INT stop. A second INT (Ctrl-C twice) ends the task at once."""

        def on_signal(signum, frame):
            sig = signal.Signals(signum)
            if sig == signal.SIGINT and self.kind != NONE:
                print("second interrupt: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            self.request(PREEMPT if sig == signal.SIGUSR2 else STOP, sig.name)

        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, on_signal)

    def restore(self) -> None:
        """Put back the handlers install() replaced (a test process lives on after the run)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, state) -> int:
        """The strongest kind any rank was asked for, on every rank (a collective: call on all ranks).

        Truthy when a stop is agreed; ``agreed_kind`` keeps it for the caller that ends the task."""
        import torch
        import torch.distributed as dist

        if state.world_size == 1 or not dist.is_initialized():
            self.agreed_kind = self.kind
            return self.agreed_kind
        t = torch.tensor([float(self.kind)], device=state.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.agreed_kind = int(t.item())
        return self.agreed_kind
