"""Train a model split over several devices: vanilla model (mp), pipeline (pp) or tensor (tp) parallel.

Submits one job through submitit: to Slurm when ``sinfo`` answers, otherwise to the local executor
(same tasks, same environment, on this host); without a GPU it runs on CPU with gloo.

    python jobs/submit.py --strategy mp --gpus 3 --check
    python jobs/submit.py --strategy reference --gpus 1 --epochs 2
    python jobs/submit.py --help
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# the job imports this code by reference: make it importable in every task, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from core.check.metrics import format_summary, read_result, write_json_atomic
from core.config import ConfigError, RunConfig
from core.data import DataError
from core.parallel.distributed import free_port
from jobs.cli import side_job
from jobs.cli.attach import attach
from jobs.cli.common import fail
from jobs.cli.compare import compare
from jobs.cli.parser import parse
from jobs.cli.plan_command import plan_command
from jobs.cli.pytest_job import PytestTask
from jobs.cli.resume import export, resume_config
from jobs.launch import hang_report, run_folder
from jobs.launch.executor import make_executor, preview
from jobs.launch.stopping import Interrupted, children_ignore_sigint, interruptible, stop_job
from jobs.launch.task import TrainTask
from jobs.launch.watch import JobFailed, wait_for
from jobs.plan.prepare import prepare
from jobs.validate.node_check import run_validate


def run_one(
    cfg: RunConfig, dry_run: bool = False, no_wait: bool = False, quiet: bool = False, resuming: bool = False
) -> tuple[int, str]:
    """Validate, submit one job, wait for it and print its summary. Returns (exit code, run folder)."""
    try:
        plan = prepare(cfg, dry_run, resuming)
    except (ConfigError, DataError) as e:
        return fail(str(e)), ""

    folder, cluster, layout = plan.run_dir, plan.cluster, plan.layout
    shown = {k: v for k, v in cfg.to_dict().items() if v not in (None, False, [])}
    if not quiet:
        print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        print(layout.describe(), flush=True)
    log_dir = os.path.join(folder, "submitit")
    if dry_run:
        print(preview(plan, log_dir))
        return 0, folder
    import submitit

    try:
        created = run_folder.claim(folder, resuming)
    except ConfigError as e:
        return fail(str(e)), ""
    try:
        executor = make_executor(plan, log_dir)
        write_json_atomic(os.path.join(folder, "config.json"), cfg.to_dict())  # what --resume restarts
        port = free_port() if cluster == "local" else None
        submitted = time.time()  # the folder may hold a previous attempt's hang reports: older
        # submitit echoes sbatch's stderr on failure; we say it once, below, in one line
        with contextlib.redirect_stderr(io.StringIO()), children_ignore_sigint():
            job = executor.submit(TrainTask(plan, port))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused: say why in its own words
        reason = next((ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()), str(e).strip())
        run_folder.release(folder, created)
        return fail(f"sbatch refused the job: {reason.split('error:')[-1].strip()}"), ""
    except BaseException:  # nothing was queued: the folder goes back to how it was
        run_folder.release(folder, created)
        raise
    run_folder.record_job(folder, job, cluster, log_dir)
    print(f"submitted job {job.job_id} to {cluster} ({layout.processes} task(s)); run folder {folder}", flush=True)
    if no_wait:
        print(f"not waiting: results will be in {folder}/result.json; follow it with --attach {folder}")
        return 0, folder
    return watch_to_end(job, cluster, folder, cfg, echo=not quiet, quiet=quiet, since=submitted), folder


def watch_to_end(
    job,
    cluster: str,
    folder: str,
    cfg: RunConfig,
    echo: bool = True,
    quiet: bool = False,
    since: float | None = None,
) -> int:
    """Follow a submitted (or re-attached) job to its end; print its summary. The exit code.
    ``since``: when this attempt was submitted (hang reports older than it are a previous one's)."""
    log_dir = os.path.join(folder, "submitit")
    say = lambda line: print(line, flush=True)  # noqa: E731
    hangs = hang_report.HangWatch(folder, job.num_tasks, say, since)
    try:
        with interruptible():
            wait_for(job, cluster, cfg, echo=echo, say=say, on_tick=hangs.tick, on_requeue=hangs.new_attempt)
    except Interrupted as e:
        return stop_job(job, cluster, folder, e.signum)
    except JobFailed as e:
        reports = hang_report.read_reports(folder, hangs.since)  # a requeue moves it on
        # a crash is told by the rank's own error; a stall or a timeout by what every rank was doing
        line, shown = hang_report.verdict(str(e), reports, job.num_tasks, hangs.at_end(reports))
        if shown:
            say(f"what each rank was doing (reports in {folder}/hang/):\n{shown}")
        ended = "was cancelled" if e.cancelled else "failed"  # scancel is the user's choice, not a fault
        return fail(f"job {job.job_id} {ended}: {line} (logs in {log_dir})", 1)
    if not quiet:
        print(format_summary(read_result(folder), folder), flush=True)
    return 0


def run_pytest_job(cfg: RunConfig, marker: str, dry_run: bool) -> int:
    """``--pytest gpu``: run this suite's ``pytest -m gpu`` as a job on a node (one task holding
    --gpus GPUs, in --container if given), so a node is checked before it is trusted."""
    import dataclasses

    if not re.fullmatch(r"[A-Za-z_][\w ]*", marker):
        return fail(f"--pytest takes a marker expression such as gpu (got {marker!r})")
    # shape the job like mp: one task that sees all the GPUs the tests may use
    cfg = dataclasses.replace(cfg, strategy="mp", model="delay", flavor="tiny", dataset=None, split=None, dp=None)
    try:
        job, plan = side_job.submit(cfg, dry_run, lambda plan: PytestTask(marker, ROOT))
        say = f"submitted 'pytest -m {marker}' as job {job.job_id} to {plan.cluster}; logs in {plan.run_dir}"
        print(say, flush=True)
        code, output = side_job.wait(job, plan, cfg, f"'pytest -m {marker}'")
    except side_job.Ended as e:
        return e.code
    print(output, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    cfg, actions, given = parse(argv)
    if actions.compare:
        return compare(cfg, run_one)
    if actions.plan or actions.auto:
        return plan_command(cfg, actions, given, run_one)
    if actions.pytest:
        return run_pytest_job(cfg, actions.pytest, actions.dry_run)
    if actions.validate:
        return run_validate(cfg, actions.thresholds, actions.dry_run)
    if actions.export:
        try:
            return export(*actions.export, force=actions.force)
        except ConfigError as e:
            return fail(str(e))
    if actions.attach:
        try:
            return attach(actions.attach, watch_to_end)
        except ConfigError as e:
            return fail(str(e))
    if actions.resume:
        try:
            cfg = resume_config(actions.resume, cfg, given)
        except ConfigError as e:
            return fail(str(e))
    return run_one(cfg, actions.dry_run, actions.no_wait, resuming=bool(actions.resume))[0]


if __name__ == "__main__":
    sys.exit(main())
