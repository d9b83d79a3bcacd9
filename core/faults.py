"""Fault injection FOR TESTS ONLY: make one rank fail at a chosen step, on the first attempt only.

    MPS_FAULT=crash:rank=1:step=5 python jobs/submit.py ...

set in the environment of the submit command (Slurm and the local executor pass it on to every
task), makes rank 1 raise ``InjectedFaultError`` after step 5 of the job's first attempt (a requeued
attempt, SLURM_RESTART_COUNT >= 1, runs clean), so retries and error reporting can be tested
against real daemons. Users never set it; nothing else reads it.
"""

from __future__ import annotations

import os


class InjectedFaultError(RuntimeError):
    """The failure MPS_FAULT asked for (tests only)."""


def attempt() -> int:
    """0 on a job's first run, k after its k-th requeue (Slurm counts them)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def maybe_fail(rank: int, step: int) -> None:
    spec = os.environ.get("MPS_FAULT")
    if not spec or attempt() > 0:
        return
    kind, *fields = spec.split(":")
    where = dict(f.split("=", 1) for f in fields)
    if kind == "crash" and int(where.get("rank", -1)) == rank and int(where.get("step", -1)) == step:
        raise InjectedFaultError(f"MPS_FAULT: rank {rank} crashed after step {step} (test-only fault injection)")
