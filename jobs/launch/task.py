"""What runs inside the job, on every task: join the process group, train, return the result."""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys

from core.check import metrics
from core.parallel import distributed
from core.training import faults, progress, train
from core.training.checkpoint import latest_checkpoint
from core.training.stop import PREEMPT, StopRequest
from jobs.plan import containers
from jobs.plan.prepare import LaunchPlan
from jobs.plan.strategies import get_build


def restrict_visible_gpus(local_rank: int, per_task: int) -> None:
    """Each task sees only its own GPUs (one for dp/pp/tp, a replica's stages for mp), so every
    process counts its devices from cuda:0. Sliced from what the node made visible (Slurm or
    the local executor set CUDA_VISIBLE_DEVICES for the whole job)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range((local_rank + 1) * per_task)]
    mine = ids[local_rank * per_task : (local_rank + 1) * per_task]
    if mine:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


class TrainTask:
    """A picklable callable submitit runs once per task (one task per process of the job)."""

    def __init__(self, plan: LaunchPlan, master_port: int | None = None) -> None:
        self.plan = plan
        self.master_port = master_port  # local runs: a free port picked on the host; Slurm: from the job id

    def __call__(self) -> dict | None:
        # first, before torch loads: a signal that comes early is still a clean stop (core.training.stop);
        # this replaces submitit's USR2 handler: we checkpoint at a step boundary ourselves
        stop = StopRequest()
        stop.install()
        faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) leaves the Python stack in stderr
        plan, layout = self.plan, self.plan.layout
        slurm = "SLURM_JOB_ID" in os.environ
        if slurm:
            _forget_previous_result()
        if layout.distributed and "RANK" not in os.environ:  # torchrun already set them
            import submitit

            if self.master_port is not None:
                os.environ["MASTER_PORT"] = str(self.master_port)
            env = submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
            # several nodes: the first node's reachable address and the interface towards it
            distributed.pin_network(verbose=env.rank == 0)
            if plan.requests_gpus:
                restrict_visible_gpus(env.local_rank, layout.devices_per_process)
        progress.enable_flight_recorder(plan.run_dir)  # NCCL reads it when the group is created
        state = distributed.init_distributed(layout, plan.device, timeout_s=plan.cfg.dist_timeout_s)
        tracker = progress.start(state.rank, plan.run_dir, plan.cfg.resolved_hang_timeout_s)
        try:
            result = train.run(plan.cfg, state, get_build(plan.cfg.strategy), out_dir=plan.run_dir, stop=stop)
            if plan.cfg.container and state.is_main:
                result["container"] = container_record(plan)
                metrics.write_json_atomic(os.path.join(plan.run_dir, "result.json"), result)
        except train.Preempted as e:
            if not slurm or stop.agreed_kind != PREEMPT:  # a stop (scancel, Ctrl-C) ends the job
                raise RuntimeError(
                    f"stopped by {stop.signal_name or 'a peer'}: {e}; continue with --resume {plan.run_dir}"
                ) from None
            if state.is_main:  # one writer asks for the requeue; the job restarts and resumes
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            sys.stdout.flush()
            os._exit(0)  # leave no result file: the requeued run writes the real one
        except Exception as e:
            # what this rank was doing when it failed: a peer's timeout names whom it waited for
            tracker.write_report(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            if slurm and requeue_after_failure(plan, state.rank, e):
                sys.stdout.flush()
                os._exit(0)  # the requeued job resumes from the checkpoint and writes the result
            raise
        finally:
            progress.finish()
            distributed.shutdown()
        return result if state.is_main else None


def container_record(plan: LaunchPlan) -> dict:
    """result.json's ``container``: the image the submission probed (engine, name, id), and the
    Python and torch this task really ran with (inside the image)."""
    import torch

    spec = containers.parse(plan.cfg.container)
    record = plan.container or {"engine": spec.engine, "image": spec.image, "image_id": None}
    python = ".".join(map(str, sys.version_info[:3]))
    return {**{k: record.get(k) for k in ("engine", "image", "image_id")}, "python": python, "torch": torch.__version__}


def requeue_after_failure(plan: LaunchPlan, rank: int, error: Exception) -> bool:
    """Under Slurm, a job that fails after a checkpoint is requeued (at most --max-retries times)
    and resumes from it. Any failing rank may ask: a peer of a dead rank fails too, and a second
    request for the same job is harmless. Returns True when the requeue was accepted."""
    import shutil

    done = faults.attempt()
    if done >= plan.cfg.max_retries:
        return False
    if latest_checkpoint(plan.run_dir) is None:
        return False  # nothing to resume from: retrying would repeat the same work
    if shutil.which("scontrol") is None:  # e.g. a container image without Slurm's commands
        print(
            f"rank {rank}: cannot requeue after this failure: scontrol is not available here (inside "
            f"the container?); continue by hand with --resume {plan.run_dir}",
            file=sys.stderr,
            flush=True,
        )
        return False
    p = subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], capture_output=True, text=True)
    if p.returncode != 0:
        return False
    print(
        f"rank {rank} failed ({type(error).__name__}: {error}); job requeued, attempt {done + 2} of "
        f"at most {plan.cfg.max_retries + 1}, resuming from the last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return True


def _forget_previous_result() -> None:
    """A requeued task must not inherit the result file its first attempt may have left (an error
    written while the job was being stopped would be read as this run's outcome)."""
    import submitit

    path = submitit.JobEnvironment().paths.result_pickle
    if path.exists():
        path.unlink()
