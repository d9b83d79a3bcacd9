"""``--attach RUN_DIR``: follow a job that is already submitted, after its submit command was closed.

The run folder's ``run.json`` (jobs.launch.run_folder) names the job: a Slurm job is rebuilt as submitit's
SlurmJob from its id and log folder; a local job, from the pid of submitit's controller on this
host (which outlives a killed submit command). Then the same watch as at submission: the log as
it grows, Slurm's answers, the summary or the failing rank, and Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable

from core.config import ConfigError, RunConfig
from jobs.launch.run_folder import job_activity, read_record


class ProcessByPid:
    """The Popen calls submitit's LocalJob and jobs.launch.stopping make, for a process this command did
    not start (the local controller of an earlier submit command)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 0
        return None

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        import time

        end = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if end is not None and time.time() > end:
                raise TimeoutError(f"process {self.pid} still running")
            time.sleep(0.2)
        return 0


def attach(run_dir: str, watch_to_end: Callable[..., int]) -> int:
    run_dir = os.path.abspath(run_dir)
    record = read_record(run_dir)
    if record is None or not os.path.exists(os.path.join(run_dir, "config.json")):
        raise ConfigError(f"--attach {run_dir}: no run.json and config.json there; give a run folder of jobs/submit.py")
    if record.get("job_id") is None:
        raise ConfigError(f"--attach {run_dir}: its job was never submitted; start it again with --resume or anew")
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    job_id, cluster = str(record["job_id"]), record["cluster"]
    active = job_activity(record)
    if cluster == "local":
        if record.get("host") != socket.gethostname():
            raise ConfigError(f"--attach {run_dir}: a local job of host {record.get('host')}: attach there")
        import submitit

        process = ProcessByPid(int(record["controller_pid"])) if active else None
        job = submitit.LocalJob(record["log_dir"], job_id, tasks=range(record["num_tasks"]), process=process)
    else:
        import submitit

        job = submitit.SlurmJob(record["log_dir"], job_id, tasks=range(record["num_tasks"]))
    print(f"attached to job {job_id} ({cluster}, {active or 'ended'}); run folder {run_dir}", flush=True)
    return watch_to_end(job, cluster, run_dir, cfg)
