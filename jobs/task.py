"""What runs inside the job, on every task: join the process group, train, return the result."""

from __future__ import annotations

import os
import subprocess
import sys

from core.config import RunConfig


class TrainTask:
    """A picklable callable submitit runs once per task (one task per process of the job)."""

    def __init__(self, cfg: dict, out_dir: str, master_port: int | None = None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.master_port = master_port  # local runs: a free port picked on the host; Slurm: from the job id

    def __call__(self) -> dict | None:
        from core import distributed, train
        from core.checkpoint import StopRequest
        from jobs.strategies import get_build

        cfg = RunConfig.from_dict(self.cfg)
        slurm = "SLURM_JOB_ID" in os.environ
        if slurm:
            _forget_previous_result()
        stop = StopRequest()
        stop.install()  # replaces submitit's USR2 handler: we checkpoint at a step boundary ourselves
        if cfg.strategy in ("pp", "tp") and "RANK" not in os.environ:  # torchrun already set them
            import submitit

            if self.master_port is not None:
                os.environ["MASTER_PORT"] = str(self.master_port)
            # one GPU per task for pp/tp (each task then sees its GPU as cuda:0)
            one_gpu_each = cfg.extra.get("on_cuda", False)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=one_gpu_each, overwrite=True)
        tp = cfg.gpus if cfg.strategy == "tp" else (cfg.tp if cfg.strategy == "pp" else 1)
        state = distributed.init_distributed(cfg.device, tp=tp, timeout_s=cfg.dist_timeout_s)
        try:
            result = train.run(cfg, state, get_build(cfg.strategy), out_dir=self.out_dir, stop=stop)
        except train.Preempted as e:
            if not slurm:
                raise RuntimeError(f"stopped: {e}; continue with --resume {self.out_dir}") from None
            if state.is_main:  # one writer asks for the requeue; the job restarts and resumes
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
            sys.stdout.flush()
            os._exit(0)  # leave no result file: the requeued run writes the real one
        finally:
            distributed.shutdown()
        return result if state.is_main else None


def _forget_previous_result() -> None:
    """A requeued task must not inherit the result file its first attempt may have left (an error
    written while the job was being stopped would be read as this run's outcome)."""
    import submitit

    path = submitit.JobEnvironment().paths.result_pickle
    if path.exists():
        path.unlink()
