"""Jobs beside training (--pytest, --validate): one way to plan, preview, submit and wait for them.

Both shape a RunConfig into a layout, refuse bad input in one line before anything starts, print
the sbatch preview under --dry-run, and then wait with the one watcher (jobs.launch.watch.wait_for), so
Ctrl-C, a failed rank and a lost node end them the way they end a training job.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from core.config import ConfigError
from core.data import DataError
from jobs.cli.common import fail
from jobs.launch.executor import make_executor, preview
from jobs.launch.stopping import Interrupted, children_ignore_sigint, interruptible, stop_job
from jobs.launch.watch import JobFailed, wait_for
from jobs.plan.prepare import prepare


class Ended(Exception):
    """The side job is over before it gave a result: ``code`` is the submit command's exit code
    (0 after a --dry-run preview, 2 for bad input, 1 for a failed job, 128+N after a signal)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def submit(cfg, dry_run: bool, make_task: Callable):
    """Plan ``cfg`` and submit ``make_task(plan)``; returns (job, plan), or raises Ended."""
    try:
        plan = prepare(cfg, dry_run)
    except (ConfigError, DataError) as e:
        raise Ended(fail(str(e))) from None
    log_dir = os.path.join(plan.run_dir, "submitit")
    if dry_run:
        print(preview(plan, log_dir))
        raise Ended(0)
    os.makedirs(plan.run_dir, exist_ok=True)
    executor = make_executor(plan, log_dir)
    with children_ignore_sigint():  # Ctrl-C reaches this command only: it stops the job itself
        return executor.submit(make_task(plan)), plan


def wait(job, plan, cfg, what: str):
    """The first task's result, or Ended: a signal stops the job (jobs.launch.stopping), a failure names
    its rank or node (jobs.launch.watch)."""
    try:
        with interruptible():
            return wait_for(job, plan.cluster, cfg, echo=False)[0]
    except Interrupted as e:
        raise Ended(stop_job(job, plan.cluster, plan.run_dir, e.signum)) from None
    except JobFailed as e:
        raise Ended(fail(f"{what} job {job.job_id} failed: {e} (logs in {plan.run_dir}/submitit)", 1)) from None
