"""Choosing and configuring the submitit executor: Slurm when it answers, else the local executor.

The local executor runs the very same task as Slurm would (one process per task, the same
environment variables), so a laptop run and a cluster run differ only in where they start.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import submitit
from submitit.local.local import LocalJob

from core.config import RunConfig
from jobs.plan import containers
from jobs.plan.prepare import LaunchPlan


def signal_lead_s(time_min: int) -> int:
    """How long before the time limit the job gets USR2 (checkpoint, then requeue): a quarter of
    the limit, at most 120 s. A fixed 120 s would arrive before a 2-minute job has even started
    (and Python's default action for USR2 kills it: exit 140); a requeued attempt would get it at
    once and loop."""
    return int(min(120, max(5, time_min * 60 // 4)))


class SlurmScriptPreview(submitit.SlurmExecutor):
    """submitit's SlurmExecutor for rendering only (--dry-run): its constructor refuses to run where
    ``srun`` is missing, but a laptop previewing a script before logging in has no Slurm. It never
    submits: its script text is submitit's own, from the same parameters."""

    @classmethod
    def affinity(cls) -> int:
        return 1

    def _submit_command(self, command: str):  # pragma: no cover - a preview never submits
        raise RuntimeError("a dry-run preview cannot submit")


class LocalExecutor(submitit.LocalExecutor):
    """submitit's local executor whose controller also records how each task ended (its signal, the
    OOM killer's evidence: jobs.launch.exits), which only the ranks' parent can see."""

    def _submit_command(self, command: str) -> LocalJob:
        # the environment submitit.local.local.start_controller gives its controller (submitit 1.5)
        gpus = self.parameters.get("gpus_per_node", 0)
        env = dict(os.environ)
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(self.parameters.get("tasks_per_node", 1)),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in range(gpus)),
            SUBMITIT_LOCAL_WITH_SHELL="",
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jobs/launch/ -> root
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen([sys.executable, "-m", "jobs.launch.exits", str(self.folder)], env=env)
        ntasks = self.parameters.get("tasks_per_node", 1)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def make_executor(plan: LaunchPlan, folder: str, preview: bool = False) -> submitit.Executor:
    """folder: submitit's log folder. Tasks and GPUs come from the plan's layout."""
    cfg, layout = plan.cfg, plan.layout
    gpus_per_node = layout.gpus_per_node if plan.requests_gpus else 0
    if plan.cluster == "local":
        ex = LocalExecutor(folder=folder)
        params = {
            "tasks_per_node": layout.processes_per_node,
            "timeout_min": cfg.time,
            "signal_delay_s": signal_lead_s(cfg.time),
        }
        if gpus_per_node:
            params["gpus_per_node"] = gpus_per_node
        ex.update_parameters(**params)
        return ex
    ex = (SlurmScriptPreview if preview else submitit.SlurmExecutor)(folder=folder)
    srun_args = [f"--kill-on-bad-exit={int(cfg.kill_on_bad_exit)}"]
    params = {
        "nodes": layout.nodes,
        "ntasks_per_node": layout.processes_per_node,
        "time": cfg.time,
        "job_name": f"mps-{cfg.strategy}",
        "signal_delay_s": signal_lead_s(cfg.time),
        "srun_args": srun_args,
    }
    optional = {
        "gpus_per_node": gpus_per_node or None,
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
        wrap_container(ex, cfg, plan.run_dir, srun_args, gpus=bool(gpus_per_node))
    ex.update_parameters(**params)
    return ex


def _value(v: str):
    return True if v.lower() == "true" else v


def container_binds(cfg: RunConfig, run_folder: str, preview: bool = False) -> list[str]:
    """Paths a task needs inside the image, at the same paths: the run folder, this repo, and the
    data folder when the run reads MNIST from it. A folder that does not exist cannot be bound
    (podman and Apptainer refuse to start): a synthetic run, or MNIST that could not be fetched
    into a missing folder, goes without it. A preview shows the MNIST folder as it would be bound."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jobs/launch/ -> root
    data = os.path.abspath(cfg.data_dir)
    paths = [os.path.abspath(run_folder)]
    if cfg.resolved_dataset == "mnist" and (preview or os.path.isdir(data)):
        paths.append(data)
    paths.append(repo)
    return list(dict.fromkeys(paths))


# docker has no --env-host: the variables a task reads, passed by name (each takes the host's value)
DOCKER_ENV = (
    "SLURM_JOB_ID SLURM_ARRAY_JOB_ID SLURM_ARRAY_TASK_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NNODES "
    "SLURM_NTASKS SLURM_PROCID SLURM_LOCALID SLURM_NODEID SLURM_RESTART_COUNT SUBMITIT_EXECUTOR "
    "SUBMITIT_PREEMPT_SIGNAL SUBMITIT_LOG_LEVEL CUDA_VISIBLE_DEVICES PYTHONPATH MPS_FAULT "
    "NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG GLOO_SOCKET_IFNAME"
).split()


def engine_run_line(engine: str, image: str, binds: list[str], gpus: bool) -> str:
    """`podman run ...` / `docker run ...` up to the image's python3: one container per Slurm task
    (Slurm's own OCI support runs one task per node), on the host's network and IPC (NCCL, gloo,
    shared memory), with Slurm's environment and the binds at the same paths. --rm: nothing left
    per task; --pull=never: a compute node never fetches an image (the submission probed it)."""
    args = [engine, "run", "--rm", "--pull=never", "--net=host", "--ipc=host"]
    if engine == "podman":
        args.append("--env-host")
    else:
        args += [f"--env={name}" for name in DOCKER_ENV]
    for path in binds:
        args += ["-v", f"{path}:{path}"]
    line = " ".join(shlex.quote(a) for a in args)
    if gpus:
        # the node's GPUs through CDI (podman) or the NVIDIA container toolkit (docker), decided on
        # the node by the batch shell: a node without GPUs (or with Slurm's GRES but no driver) runs
        # on the CPU instead of failing on an unresolvable device
        flag = "--device nvidia.com/gpu=all" if engine == "podman" else "--gpus all"
        line += f" $(test -e /dev/nvidia0 && echo {flag})"
    return f"{line} {shlex.quote(image)} python3"


def wrap_container(
    ex: submitit.SlurmExecutor, cfg: RunConfig, run_folder: str, srun_args: list[str], gpus: bool = False
) -> None:
    """Run each task's python in the image: Apptainer (a .sif), pyxis/enroot (pyxis:IMAGE), or a
    Docker-compatible engine (podman:IMAGE, docker:IMAGE)."""
    binds = container_binds(cfg, run_folder, preview=isinstance(ex, SlurmScriptPreview))
    container = containers.parse(cfg.container)
    if container.engine == "pyxis":
        srun_args += [
            f"--container-image={container.image}",
            "--container-mounts=" + ",".join(f"{p}:{p}" for p in binds),
        ]
        ex.python = "python3"
    elif container.engine in containers.ENGINES:
        ex.python = engine_run_line(container.engine, container.image, binds, gpus)
    else:
        ex.python = f"apptainer exec --nv --bind {shlex.quote(','.join(binds))} {shlex.quote(container.image)} python3"


def describe(ex: submitit.Executor, plan: LaunchPlan) -> str:
    """What --dry-run prints: the sbatch script for Slurm, the process plan for local runs."""
    if plan.cluster == "slurm":  # SlurmExecutor renders its script from the parameters
        return ex._make_submission_file_text(ex._submitit_command_str, "<uid>")
    return (
        f"local executor (submitit): {plan.layout.processes_per_node} process(es) on this host, "
        f"gpus_per_node={ex.parameters.get('gpus_per_node', 0)}, time limit {plan.cfg.time} min, "
        f"folder {ex.folder}\n"
        f"each process runs: {ex._submitit_command_str}"
    )


def preview(plan: LaunchPlan, log_dir: str) -> str:
    """--dry-run's text for a job whose logs would go to ``log_dir``, creating nothing: submitit's
    executors make their folder, so the plan is rendered in a scratch one and the name put back."""
    import tempfile

    scratch = tempfile.mkdtemp(prefix="mps-dry-run-")
    try:
        text = describe(make_executor(plan, scratch, preview=True), plan).replace(scratch, log_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return f"dry run: would submit to {plan.cluster}; run folder {plan.run_dir}\n{text}"
