"""Finding a job's rank processes by what submitit and Slurm put in their environment (/proc), so
a test can kill or stop one rank by pid as a failing node or the OOM killer would."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def _environ(pid: str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def rank_pid(rank: int, run_dir: str, timeout_s: float = 120.0) -> int:
    """The pid of ``rank``'s python process of the job writing into ``run_dir`` (local or Slurm)."""
    deadline = time.time() + timeout_s
    folder = os.path.join(os.path.abspath(run_dir), "submitit")
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            # every task runs ``python -u -m submitit.core._submit FOLDER``
            if "submitit.core._submit" not in argv or argv[-2:-1] != [folder] and folder not in argv:
                continue
            env = _environ(pid)
            if env.get("SUBMITIT_LOCAL_GLOBALID", env.get("SLURM_PROCID")) == str(rank):
                return int(pid)
        time.sleep(0.3)
    raise TimeoutError(f"no process of rank {rank} for {run_dir} within {timeout_s} s")


def start_submit(*args: str, cwd, env: dict | None = None) -> subprocess.Popen:
    """``python jobs/submit.py ARGS`` in the background, as a user's terminal would hold it."""
    submit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "submit.py")
    return subprocess.Popen(
        [sys.executable, submit, *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_text(path: str, text: str, timeout_s: float = 180.0) -> None:
    """Until ``text`` appears in the file at ``path`` (a rank's log): the job is really running."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout_s} s")


def rank0_log(run_dir: str) -> str:
    """The rank 0 stdout file of the (only) job in run_dir, once it exists."""
    folder = os.path.join(run_dir, "submitit")
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.isdir(folder):
            logs = sorted(f for f in os.listdir(folder) if f.endswith("_0_log.out"))
            if logs:
                return os.path.join(folder, logs[-1])
        time.sleep(0.3)
    raise TimeoutError(f"no rank 0 log in {folder}")
