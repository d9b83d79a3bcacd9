"""Which cluster runs the job: Slurm when its controller answers, else submitit's local executor."""

from __future__ import annotations

import re
import shutil
import subprocess

from core.config import ConfigError, RunConfig


def slurm_status(timeout_s: float = 30.0) -> str:
    """ "answers", "absent" (no Slurm commands, or none configured here) or "silent" (configured,
    but its controller does not answer). ``sinfo -h`` answering is the test: srun on PATH alone
    does not mean a controller is up."""
    if shutil.which("sinfo") is None:
        return "absent"
    try:
        p = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "silent"
    except OSError:
        return "absent"
    if p.returncode == 0:
        return "answers"
    # no slurm.conf and no DNS SRV record: the commands are installed, but no cluster is set up
    if re.search(r"configuration source|fetch_config|slurm\.conf", p.stderr, re.I):
        return "absent"
    return "silent"


def resolve_cluster(cfg: RunConfig) -> str:
    """--cluster auto: Slurm when it answers, the local executor where there is no Slurm. A Slurm
    that is set up but silent is an error: running on the login node instead would surprise."""
    if cfg.cluster != "auto":
        return cfg.cluster
    status = slurm_status()
    if status == "silent":
        raise ConfigError(
            "Slurm is set up on this host but its controller does not answer (sinfo failed): wait and "
            "run again, or run on this host with --cluster local"
        )
    return "slurm" if status == "answers" else "local"
