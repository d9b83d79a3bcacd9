"""Choosing and configuring the submitit executor: Slurm when it answers, else the local executor.

The local executor runs the very same task as Slurm would (one process per task, the same
environment variables), so a laptop run and a cluster run differ only in where they start.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess

import submitit

from core.config import RunConfig


def slurm_answers(timeout_s: float = 10.0) -> bool:
    """``sinfo -h`` answering is the test: srun on PATH alone does not mean a controller is up."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=timeout_s).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def resolve_cluster(cfg: RunConfig) -> str:
    if cfg.cluster == "auto":
        return "slurm" if slurm_answers() else "local"
    return cfg.cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_shape(cfg: RunConfig, on_cuda: bool) -> dict:
    """Tasks and GPUs: one task per device for pp/tp, one task holding all devices for mp/reference."""
    tasks = cfg.world_size // cfg.nodes if cfg.world_size > 1 else 1
    gpus = cfg.gpus // cfg.nodes if on_cuda else 0
    return {"nodes": cfg.nodes, "tasks_per_node": tasks, "gpus_per_node": gpus}


def make_executor(
    cfg: RunConfig, folder: str, cluster: str, on_cuda: bool, run_folder: str | None = None
) -> submitit.Executor:
    """folder: submitit's log folder; run_folder: the run folder tasks write to (bound into a container)."""
    shape = job_shape(cfg, on_cuda)
    if cluster == "local":
        ex = submitit.LocalExecutor(folder=folder)
        params = {"tasks_per_node": shape["tasks_per_node"], "timeout_min": cfg.time}
        if shape["gpus_per_node"]:
            params["gpus_per_node"] = shape["gpus_per_node"]
        ex.update_parameters(**params)
        return ex
    ex = submitit.SlurmExecutor(folder=folder)
    srun_args = [f"--kill-on-bad-exit={int(cfg.kill_on_bad_exit)}"]
    params = {
        "nodes": shape["nodes"],
        "ntasks_per_node": shape["tasks_per_node"],
        "time": cfg.time,
        "job_name": f"mps-{cfg.strategy}",
        # submitit sends USR2 this long before the time limit: enough to checkpoint and requeue
        "signal_delay_s": 120,
        "srun_args": srun_args,
    }
    optional = {
        "gpus_per_node": shape["gpus_per_node"] or None,
        "partition": cfg.partition,
        "account": cfg.account,
        "qos": cfg.qos,
        "constraint": cfg.constraint,
        "cpus_per_task": cfg.cpus_per_task,
        "mem": cfg.mem,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = dict(opt.split("=", 1) for opt in cfg.slurm_opts)
    if extra:
        params["additional_parameters"] = {k.strip().replace("-", "_"): _value(v.strip()) for k, v in extra.items()}
    if cfg.container:
        wrap_container(ex, cfg, run_folder or os.path.dirname(os.path.abspath(folder)), srun_args)
    ex.update_parameters(**params)
    return ex


def _value(v: str):
    return True if v.lower() == "true" else v


def container_binds(cfg: RunConfig, run_folder: str) -> list[str]:
    """Paths a task needs inside the image, at the same paths: the run folder, the data, this repo."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [os.path.abspath(run_folder), os.path.abspath(cfg.data_dir), repo]
    return list(dict.fromkeys(paths))


def wrap_container(ex: submitit.SlurmExecutor, cfg: RunConfig, run_folder: str, srun_args: list[str]) -> None:
    """Run each task's python in the image: Apptainer (a .sif) or pyxis/enroot (pyxis:IMAGE)."""
    binds = container_binds(cfg, run_folder)
    if cfg.container.startswith("pyxis:"):
        srun_args += [
            f"--container-image={cfg.container[len('pyxis:') :]}",
            "--container-mounts=" + ",".join(f"{p}:{p}" for p in binds),
        ]
        ex.python = "python3"
    else:
        ex.python = (
            f"apptainer exec --nv --bind {shlex.quote(','.join(binds))} "
            f"{shlex.quote(os.path.abspath(cfg.container))} python3"
        )


def describe(ex: submitit.Executor, cluster: str, cfg: RunConfig) -> str:
    """What --dry-run prints: the sbatch script for Slurm, the process plan for local runs."""
    if cluster == "slurm":
        inner = ex  # SlurmExecutor renders its script from the parameters; the command is submitit's
        return inner._make_submission_file_text(inner._submitit_command_str, "<uid>")
    shape = job_shape(cfg, bool(ex.parameters.get("gpus_per_node")))
    return (
        f"local executor (submitit): {shape['tasks_per_node']} process(es) on this host, "
        f"gpus_per_node={shape['gpus_per_node']}, time limit {cfg.time} min, folder {ex.folder}\n"
        f"each process runs: {ex._submitit_command_str}"
    )
