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

from core.config import ConfigError, RunConfig  # noqa: E402
from core.data import DataError  # noqa: E402
from jobs.cli import parse  # noqa: E402
from jobs.plan import prepare  # noqa: E402


class JobFailed(RuntimeError):
    pass


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def shutil_rmtree_quiet(folder: str) -> None:
    """Remove a run folder this command created for a job that was never queued."""
    import shutil

    if not os.path.exists(os.path.join(folder, "result.json")):
        shutil.rmtree(folder, ignore_errors=True)


class JobVanished(RuntimeError):
    """The job left the queue without writing a result (it died before Python could report)."""


def slurm_state(job_id: str) -> str | None:
    """The job's state from squeue (or scontrol for a finished job), None when Slurm forgot it.

    submitit asks sacct, which needs the accounting daemon: without one it would wait forever
    for a job that died before writing its result."""
    import subprocess

    out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()[0]
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", out.stdout)
    return m.group(1) if m else None


def slurm_results_written(job) -> bool:
    """Every task wrote its result file. Asked of the files, not of submitit, whose sacct calls
    fail (and print) on clusters without an accounting daemon."""
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def slurm_results(job) -> list:
    """The tasks' return values read from their result files; a task's error raises."""
    from submitit.core.utils import pickle_load

    out = []
    for i in range(job.num_tasks):
        outcome, value = pickle_load(job.task(i).paths.result_pickle)
        if outcome != "success":
            raise RuntimeError(f"task {i} failed")
        out.append(value)
    return out


def follow(job, slurm: bool = False, grace_s: float = 10.0, echo: bool = True) -> None:
    """Print rank 0's log as it grows, until the job ends: progress without a second terminal.

    Under Slurm, a job that has left the queue without results for ``grace_s`` raises JobVanished
    carrying the task's stderr, instead of waiting forever."""
    path, pos = None, 0
    gone_since, checked = None, 0.0
    while True:
        done = slurm_results_written(job) if slurm else job.done()
        if slurm and not done and time.time() - checked > 3:
            checked = time.time()
            state = slurm_state(job.job_id)
            finished = state is None or state in (
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE",
                "COMPLETED",
                "PREEMPTED",
            )
            gone_since = (gone_since or time.time()) if finished else None
            if gone_since and time.time() - gone_since > grace_s:
                err = first_failure(job)
                raise JobVanished(f"Slurm reports {state or 'no such job'} and no result was written; {err}")
        if path is None:
            path = str(job.task(0).paths.stdout)
        if echo and os.path.exists(path):
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            for line in chunk.splitlines():
                if not line.startswith("submitit "):
                    print(f"  | {line}", flush=True)
        if done:
            return
        time.sleep(0.5)


SECONDARY = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "communicator was aborted",
    "job did not complete",
)


def exception_line(text: str) -> str:
    """The 'SomeError: message' line of a traceback that submitit re-raised as text."""
    text = text.split("You can check full logs")[0]
    lines = [ln.split("]: ", 1)[-1] for ln in text.splitlines() if ln.strip() and not ln.startswith("---")]
    hits = [ln.strip() for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln.strip())]
    return hits[-1] if hits else (lines[-1].strip() if lines else "no message")


def first_failure(job) -> str:
    """The real exception of the failing task, not a neighbour's timeout or broken connection.

    Read from every task's stderr, never by asking submitit for results: a task killed by Slurm
    (--kill-on-bad-exit) writes none, and waiting for it would hang."""
    texts = {}
    for i in range(job.num_tasks):
        try:
            with open(job.task(i).paths.stderr, errors="replace") as f:
                texts[i] = f.read()
        except OSError:
            continue
    messages = [(i, exception_line(t)) for i, t in texts.items() if re.search(r"(Error|Exception)\b", t)]
    for i, msg in messages:  # a rank's own error beats what its peers saw when it died
        if not any(k in msg.lower() for k in SECONDARY):
            return f"rank {i}: {msg}"
    if messages:
        return f"rank {messages[0][0]}: {messages[0][1]}"
    for i, text in texts.items():  # died before Python could raise (srun, container, node): say what it said
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:  # the first error line is the cause (slurmstepd's execve failure, ...); srun's follow
            return f"task {i} stderr: {next((ln for ln in lines if 'error' in ln.lower()), lines[-1])}"
    return "no task wrote anything to its stderr"


def run_one(
    cfg: RunConfig, dry_run: bool = False, no_wait: bool = False, quiet: bool = False, resuming: bool = False
) -> tuple[int, str]:
    """Validate, submit one job, wait for it and print its summary. Returns (exit code, run folder)."""
    try:
        plan = prepare(cfg, dry_run, resuming)
    except (ConfigError, DataError) as e:
        return fail(str(e)), ""

    from core.metrics import format_summary, read_result, write_json_atomic
    from jobs.executor import describe, free_port, make_executor
    from jobs.task import TrainTask

    folder, cluster, layout = plan.run_dir, plan.cluster, plan.layout
    shown = {k: v for k, v in cfg.to_dict().items() if v not in (None, False, [])}
    if not quiet:
        print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        print(layout.describe(), flush=True)
    log_dir = os.path.join(folder, "submitit")
    if dry_run:  # submitit's executors create their folder: render the plan in a scratch one
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="mps-dry-run-")
        try:
            text = describe(make_executor(plan, scratch, preview=True), plan).replace(scratch, log_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"dry run: would submit to {cluster}; run folder {folder}")
        print(text)
        return 0, folder
    import submitit

    executor = make_executor(plan, log_dir)
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(os.path.join(folder, "config.json"), cfg.to_dict())  # what --resume restarts
    port = free_port() if cluster == "local" else None
    try:
        # submitit echoes sbatch's stderr on failure; we say it once, below, in one line
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(TrainTask(plan, port))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused: say why in its own words
        reason = next((ln.strip() for ln in str(e).splitlines() if "error" in ln.lower()), str(e).strip())
        shutil_rmtree_quiet(folder)
        return fail(f"sbatch refused the job: {reason.split('error:')[-1].strip()}"), ""
    print(f"submitted job {job.job_id} to {cluster} ({layout.processes} task(s)); run folder {folder}", flush=True)
    if no_wait:
        print(f"not waiting: results will be in {folder}/result.json")
        return 0, folder
    try:
        if quiet and cluster == "local":
            job.wait()
        else:
            follow(job, slurm=cluster == "slurm", echo=not quiet)
        slurm_results(job) if cluster == "slurm" else job.results()
    except KeyboardInterrupt:
        job.cancel()
        return fail("interrupted: job cancelled", 130), folder
    except Exception as e:  # a lost node is named first (jobs.nodes), with its ranks and whether a retry fits
        from jobs.nodes import explain_failure

        why = explain_failure(job, str(e) if isinstance(e, JobVanished) else first_failure(job), cfg)
        return fail(f"job {job.job_id} failed: {why} (logs in {log_dir})", 1), folder
    if not quiet:
        print(format_summary(read_result(folder), folder), flush=True)
    return 0, folder


def run_pytest_job(cfg: RunConfig, marker: str, dry_run: bool) -> int:
    """``--pytest gpu``: run this suite's ``pytest -m gpu`` as a job on a node (one task holding
    --gpus GPUs, in --container if given), so a node is checked before it is trusted."""
    import dataclasses

    from jobs.executor import describe, make_executor
    from jobs.pytest_job import PytestTask

    if not re.fullmatch(r"[A-Za-z_][\w ]*", marker):
        return fail(f"--pytest takes a marker expression such as gpu (got {marker!r})")
    # shape the job like mp: one task that sees all the GPUs the tests may use
    cfg = dataclasses.replace(cfg, strategy="mp", model="delay", flavor="tiny", dataset=None, split=None, dp=None)
    try:
        plan = prepare(cfg, dry_run)
    except (ConfigError, DataError) as e:
        return fail(str(e))
    executor = make_executor(plan, os.path.join(plan.run_dir, "submitit"), preview=dry_run)
    if dry_run:
        print(describe(executor, plan))
        return 0
    job = executor.submit(PytestTask(marker, ROOT))
    print(f"submitted 'pytest -m {marker}' as job {job.job_id} to {plan.cluster}; logs in {plan.run_dir}", flush=True)
    try:
        follow(job, slurm=plan.cluster == "slurm", echo=False)
        code, output = slurm_results(job)[0] if plan.cluster == "slurm" else job.result()
    except Exception:
        return fail(f"job {job.job_id} failed: {first_failure(job)}", 1)
    print(output, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    cfg, actions, given = parse(argv)
    if actions.compare:
        from jobs.compare import compare

        return compare(cfg, run_one)
    if actions.pytest:
        return run_pytest_job(cfg, actions.pytest, actions.dry_run)
    if actions.validate:
        from jobs.validate import run_validate

        return run_validate(cfg, actions.thresholds, actions.dry_run)
    if actions.export:
        from jobs.resume import export

        try:
            return export(*actions.export, force=actions.force)
        except ConfigError as e:
            return fail(str(e))
    if actions.resume:
        from jobs.resume import resume_config

        try:
            cfg = resume_config(actions.resume, cfg, given)
        except ConfigError as e:
            return fail(str(e))
    return run_one(cfg, actions.dry_run, actions.no_wait, resuming=bool(actions.resume))[0]


if __name__ == "__main__":
    sys.exit(main())
