"""Ending a job on request: Ctrl-C, SIGTERM or SIGHUP to the submit command.

The first signal asks the ranks to save a checkpoint at the next step boundary and end (core.training.stop:
SIGTERM reaches them through submitit's local controller, or through ``scancel`` under Slurm);
the submit command waits for that at most STOP_WAIT_S, then ends them. A second signal ends them
at once. Either way one line says where the run stands and how to continue it, and a local job
is never left running without the command that watches it.

Under Slurm only Ctrl-C cancels the job: SIGTERM or SIGHUP to the submit command (a closed
terminal, a ``timeout``) leaves the batch job running, and ``--attach RUN_DIR`` follows it again.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

from core.training.checkpoint import latest_checkpoint
from jobs.launch.processes import kill_local
from jobs.launch.watch import ACTIVE, query_job

STOP_WAIT_S = 60.0
"""How long a stop may take: the next step boundary plus a checkpoint (Slurm's own KillWait,
30 s by default, bounds a cancelled job on the cluster side)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """The submit command received ``signum`` (a BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible():
    """Within: SIGINT, SIGTERM and SIGHUP raise Interrupted (no traceback, no orphaned job)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def children_ignore_sigint():
    """Processes started within inherit SIGINT ignored. submitit's local controller then survives a
    terminal Ctrl-C (which reaches the whole process group): on its own KeyboardInterrupt it would
    kill the ranks within a second, before they can checkpoint. The ranks set their own handlers
    (core.training.stop) and still hear Ctrl-C; Python keeps an inherited 'ignore' at start."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _local_over(process) -> bool:
    return process.poll() is not None


def _slurm_over(job_id: str) -> bool:
    a = query_job(job_id)
    return a.answered and a.state not in ACTIVE


def _checkpoint_step(run_dir: str) -> int | None:
    latest = latest_checkpoint(run_dir)
    return None if latest is None else latest["position"]["step"]


def stop_job(job, cluster: str, run_dir: str, signum: int, say=print) -> int:
    """Handle the submit command's first signal; returns its exit code (128 + signal)."""
    name = signal.Signals(signum).name
    code = 128 + signum
    before = _checkpoint_step(run_dir)
    if cluster == "slurm" and signum != signal.SIGINT:
        say(
            f"{name}: job {job.job_id} continues on Slurm; follow it again with --attach {run_dir}, "
            f"or stop it with scancel {job.job_id}"
        )
        return code
    if cluster == "slurm":
        subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=30)
        over = lambda: _slurm_over(str(job.job_id))  # noqa: E731
        kill = lambda: subprocess.run(["scancel", "-s", "KILL", str(job.job_id)], capture_output=True, timeout=30)  # noqa: E731
    else:
        process = job._process
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # the controller forwards it to every rank
        over = lambda: _local_over(process)  # noqa: E731
        kill = lambda: kill_local(process)  # noqa: E731
    say(
        f"{name}: stopping job {job.job_id}: the ranks save a checkpoint at the next step boundary "
        f"(waiting up to {STOP_WAIT_S:.0f} s; interrupt again to stop at once)"
    )
    deadline = time.time() + STOP_WAIT_S
    forced = False
    with interruptible():
        try:
            while not over():
                if time.time() > deadline:
                    forced = True
                    break
                time.sleep(0.5)
        except Interrupted:
            forced = True
        if forced:
            kill()
    after = _checkpoint_step(run_dir)
    if after is not None and after != before:
        say(f"stopped at step {after} with a checkpoint: continue with --resume {run_dir}")
    elif after is not None:
        how = "stopped at once" if forced else "stopped"
        say(f"{how} before the next checkpoint; the last one (step {after}) remains: continue with --resume {run_dir}")
    else:
        say(f"stopped before any checkpoint was saved: nothing to resume in {run_dir}")
    return code
