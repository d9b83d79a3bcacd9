"""A run folder belongs to one run: claimed atomically, recorded with its job, never shared.

``run.json`` in the folder names the job that owns it (cluster, job id, the local controller's
pid and host, submitit's log folder, the number of tasks). It is what a second submit command
sees (and refuses), what ``--resume`` asks before starting (the original must have ended), and
what ``--attach`` follows. The claim is made under an exclusive ``flock`` on ``.claim``, so two
commands racing for one folder cannot both win; it is taken after every check and the data
fetch, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

from core.check.metrics import write_json_atomic
from core.config import ConfigError
from jobs.launch.watch import ACTIVE, query_job

RECORD = "run.json"
LOCK = ".claim"
RUN_FILES = ("config.json", "result.json", "checkpoint", RECORD, "submitit")
"""What makes a folder a run's: a folder holding none of these may be used for a new run."""


def read_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_record(folder: str, record: dict) -> None:
    write_json_atomic(os.path.join(folder, RECORD), record)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_activity(record: dict) -> str | None:
    """What the recorded job is doing if it still holds the folder ("RUNNING", "PENDING", ...),
    None when it has ended. A controller that does not answer counts as active: better to refuse
    a resume than to start a duplicate."""
    if record.get("job_id") is None:  # claimed by a submit command that is still submitting
        pid = record.get("submitter_pid")
        same_host = record.get("host") == socket.gethostname()
        fresh = time.time() - record.get("claimed_at", 0) < 600
        return "being submitted" if pid and same_host and _pid_alive(pid) and fresh else None
    if record.get("cluster") == "local":
        pid = record.get("controller_pid")
        if record.get("host") != socket.gethostname():
            return None  # another host's local job: cannot be asked; the folder is not shared live
        return "RUNNING" if pid and _pid_alive(pid) else None
    a = query_job(str(record["job_id"]))
    if not a.answered:
        return "unknown (Slurm does not answer)"
    return a.state if a.state in ACTIVE else None


@contextlib.contextmanager
def _locked(folder: str):
    fd = os.open(os.path.join(folder, LOCK), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"--out {folder}: another submit command is claiming this folder right now; choose another --out"
            ) from None
        yield
    finally:
        os.close(fd)


def claim(folder: str, resuming: bool) -> bool:
    """Make ``folder`` this run's, or raise ConfigError saying whose it is. Returns True when the
    folder was created here (so a failed submission removes it again)."""
    created = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--out {folder} cannot be created ({e.strerror}): choose a folder you can write to"
        ) from None
    try:
        with _locked(folder):
            record = read_record(folder)
            if not resuming and (record is not None or any(os.path.exists(os.path.join(folder, n)) for n in RUN_FILES)):
                owner = f" (job {record['job_id']}, {record['cluster']})" if record and record.get("job_id") else ""
                raise ConfigError(
                    f"--out {folder} already holds a run{owner}: continue it with --resume {folder}, "
                    "or choose another folder (nothing is overwritten)"
                )
            if record is not None:
                active = job_activity(record)
                if active:
                    job = record.get("job_id")
                    how = (
                        f"follow it with --attach {folder}, or stop it first"
                        + (f" (scancel {job})" if record.get("cluster") == "slurm" else "")
                        if job
                        else "wait for that command to finish"
                    )
                    raise ConfigError(
                        f"--out {folder}: its job {job or ''} is still {active}: {how}; "
                        "a second job would write the same checkpoints and result"
                    )
            write_record(
                folder,
                {"job_id": None, "submitter_pid": os.getpid(), "host": socket.gethostname(), "claimed_at": time.time()},
            )
    except ConfigError:
        if created:
            _remove_empty(folder)
        raise
    return created


def _remove_empty(folder: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, LOCK))
    with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, RECORD))
    with contextlib.suppress(OSError):
        os.rmdir(folder)


def release(folder: str, created: bool) -> None:
    """A submission that never queued: give the folder back as it was."""
    import shutil

    if created:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, RECORD))


def record_job(folder: str, job, cluster: str, log_dir: str) -> None:
    """After submission: the job that now owns the folder (what --resume and --attach read)."""
    record = read_record(folder) or {}
    process = getattr(job, "_process", None)
    record.update(
        job_id=str(job.job_id),
        cluster=cluster,
        host=socket.gethostname(),
        log_dir=log_dir,
        num_tasks=job.num_tasks,
        controller_pid=process.pid if process is not None else None,
        submitted_at=time.time(),
    )
    write_record(folder, record)
