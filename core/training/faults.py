"""Fault injection FOR TESTS ONLY: make one rank fail at a chosen step, on the first attempt only.

    MPS_FAULT=crash:rank=1:step=5 python jobs/submit.py ...
    MPS_FAULT=hang:rank=1:step=3 python jobs/submit.py ...
    MPS_FAULT=kill:rank=1:step=2:signal=SEGV python jobs/submit.py ...
    MPS_FAULT=oom:rank=1:step=2:mb=4000 python jobs/submit.py ...

set in the environment of the submit command (Slurm and the local executor pass it on to every
task), makes rank 1 raise ``InjectedFaultError`` after step 5 of the job's first attempt (``crash``), or
stop responding when step 3 begins (``hang``: it sleeps, as a rank stuck in a driver would), signal
itself after step 2 (``kill``: SIGSEGV here, as a crash in native code would), or allocate memory
after step 2 until the kernel's OOM killer ends it (``oom``: at most ``mb`` MB, then it raises; only
safe inside a memory-limited cgroup, as the tests run it) (a requeued
attempt, SLURM_RESTART_COUNT >= 1, runs clean), so retries and error reporting can be tested
against real daemons. Users never set it; nothing else reads it.
"""

from __future__ import annotations

import os

from core.training import progress


class InjectedFaultError(RuntimeError):
    """The failure MPS_FAULT asked for (tests only)."""


def attempt() -> int:
    """0 on a job's first run, k after its k-th requeue (Slurm counts them)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def maybe_fail(rank: int, step: int) -> None:
    spec = _spec()
    if spec is None:
        return
    kind, where = spec
    if int(where.get("rank", -1)) != rank or int(where.get("step", -1)) != step:
        return
    if kind == "crash":
        raise InjectedFaultError(f"MPS_FAULT: rank {rank} crashed after step {step} (test-only fault injection)")
    if kind == "kill":
        import signal
        import sys

        sys.stdout.flush()
        os.kill(os.getpid(), getattr(signal, "SIG" + where.get("signal", "KILL").upper().removeprefix("SIG")))
        signal.pause()  # a signal whose action is to end the process has ended it by now
    if kind == "oom":
        held, chunk = [], 64
        for _ in range(int(where.get("mb", 4000)) // chunk):
            held.append(b"\1" * (chunk << 20))  # written, so the pages are really taken
        raise InjectedFaultError(f"MPS_FAULT: rank {rank} allocated {len(held) * chunk} MB and was not OOM-killed")


def _spec() -> tuple[str, dict] | None:
    spec = os.environ.get("MPS_FAULT")
    if not spec or attempt() > 0:
        return None
    kind, *fields = spec.split(":")
    return kind, dict(f.split("=", 1) for f in fields)


def maybe_hang(rank: int, step: int) -> None:
    """``hang:rank=R:step=S``: rank R stops responding as step S begins (until it is killed)."""
    spec = _spec()
    if spec is None or spec[0] != "hang":
        return
    where = spec[1]
    if int(where.get("rank", -1)) == rank and int(where.get("step", -1)) == step:
        import time

        p = progress.current()
        if p is not None:  # the action changes, the time of the last progress does not
            p.action = f"not responding (MPS_FAULT hang at step {step}, test only)"
        while True:
            time.sleep(3600)
