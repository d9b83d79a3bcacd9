"""Train a model split over several devices: vanilla model (mp), pipeline (pp) or tensor (tp) parallel.

Submits one job through submitit: to Slurm when ``sinfo`` answers, otherwise to the local executor
(same tasks, same environment, on this host); without a GPU it runs on CPU with gloo.

    python jobs/submit.py --strategy mp --gpus 3 --check
    python jobs/submit.py --strategy reference --gpus 1 --epochs 2
    python jobs/submit.py --help
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# the job imports this code by reference: make it importable in every task, installed or not
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from core.config import ConfigError, RunConfig, validate  # noqa: E402
from core.data import DataError, download_mnist, load_mnist  # noqa: E402
from jobs.cli import build_parser, config_from_args  # noqa: E402


class JobFailed(RuntimeError):
    pass


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def prepare(cfg: RunConfig) -> tuple[str, str, bool]:
    """Validate, pick the cluster and device, fetch data. Returns (cluster, run folder, on_cuda)."""
    import torch

    from jobs.executor import resolve_cluster
    from jobs.strategies import get_validator

    cluster = resolve_cluster(cfg) if cfg.cluster in ("auto", "slurm", "local") else cfg.cluster
    cfg.extra["cluster"] = cluster
    cuda_count = torch.cuda.device_count()
    validate(cfg, cuda_count)
    get_validator(cfg.strategy)(cfg)
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and (cluster == "slurm" or cuda_count > 0))
    cfg.extra["on_cuda"] = on_cuda
    cfg.device = "cuda" if on_cuda else "cpu"

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = os.path.abspath(cfg.out or os.path.join("runs", f"{cfg.strategy}-{stamp}"))
    if os.path.exists(os.path.join(folder, "result.json")):
        raise ConfigError(f"--out {folder} already holds a result: choose another folder (nothing is overwritten)")
    if os.path.isfile(folder):
        raise ConfigError(f"--out {folder} is a file: give a folder")

    if cfg.resolved_dataset == "mnist":
        # fetched here, on the submitting host: a compute node never downloads
        why = download_mnist(cfg.data_dir) if os.access(_existing_parent(cfg.data_dir), os.W_OK) else "read-only"
        if why:
            print(f"note: MNIST could not be downloaded into {cfg.data_dir} ({why})", flush=True)
        cfg.extra["data_source"] = load_mnist(cfg.data_dir).description
        print(f"data: {cfg.extra['data_source']}", flush=True)
    return cluster, folder, on_cuda


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def follow(job, stop_when_done: bool = True) -> None:
    """Print rank 0's log as it grows, until the job ends: progress without a second terminal."""
    path, pos = None, 0
    while True:
        done = job.done()
        if path is None:
            path = str(job.task(0).paths.stdout)
        if os.path.exists(path):
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
    """The real exception of the failing task, not a neighbour's timeout or broken connection."""
    messages = []
    for i in range(job.num_tasks):
        try:
            job.task(i).result()
        except Exception as e:  # the task's own exception, re-raised by submitit with its traceback
            messages.append((i, exception_line(str(e))))
    for i, msg in messages:  # a rank's own error beats what its peers saw when it died
        if not any(k in msg.lower() for k in SECONDARY):
            return f"rank {i}: {msg}"
    return f"rank {messages[0][0]}: {messages[0][1]}" if messages else "unknown failure"


def run_one(cfg: RunConfig, dry_run: bool = False, no_wait: bool = False, quiet: bool = False) -> tuple[int, str]:
    """Validate, submit one job, wait for it and print its summary. Returns (exit code, run folder)."""
    try:
        cluster, folder, on_cuda = prepare(cfg)
    except (ConfigError, DataError) as e:
        return fail(str(e)), ""

    from core.metrics import format_summary, read_result
    from jobs.executor import describe, free_port, make_executor
    from jobs.task import TrainTask

    shown = {k: v for k, v in cfg.to_dict().items() if v not in (None, {}, False) and k != "extra"}
    if not quiet:
        print("config: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
    log_dir = os.path.join(folder, "submitit")
    if dry_run:  # submitit's executors create their folder: render the plan in a scratch one
        import shutil
        import tempfile

        scratch = tempfile.mkdtemp(prefix="mps-dry-run-")
        try:
            plan = describe(make_executor(cfg, scratch, cluster, on_cuda), cluster, cfg).replace(scratch, log_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"dry run: would submit to {cluster}; run folder {folder}")
        print(plan)
        return 0, folder
    executor = make_executor(cfg, log_dir, cluster, on_cuda)
    os.makedirs(folder, exist_ok=True)
    port = free_port() if cluster == "local" else None
    job = executor.submit(TrainTask(cfg.to_dict(), folder, port))
    print(f"submitted job {job.job_id} to {cluster} ({cfg.world_size} task(s)); run folder {folder}", flush=True)
    if no_wait:
        print(f"not waiting: results will be in {folder}/result.json")
        return 0, folder
    try:
        if quiet:
            job.wait()
        else:
            follow(job)
        job.results()
    except KeyboardInterrupt:
        job.cancel()
        return fail("interrupted: job cancelled", 130), folder
    except Exception:
        return fail(f"job {job.job_id} failed: {first_failure(job)} (logs in {log_dir})", 1), folder
    if not quiet:
        print(format_summary(read_result(folder), folder), flush=True)
    return 0, folder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.compare:
        from jobs.compare import compare

        return compare(cfg, run_one)
    return run_one(cfg, args.dry_run, args.no_wait)[0]


if __name__ == "__main__":
    sys.exit(main())
