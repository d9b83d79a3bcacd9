"""What runs inside the job, on every task: join the process group, train, return the result."""

from __future__ import annotations

import os

from core.config import RunConfig


class TrainTask:
    """A picklable callable submitit runs once per task (one task per process of the job)."""

    def __init__(self, cfg: dict, out_dir: str, master_port: int | None = None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.master_port = master_port  # local runs: a free port picked on the host; Slurm: from the job id

    def __call__(self) -> dict | None:
        from core import distributed, train
        from jobs.strategies import get_build

        cfg = RunConfig.from_dict(self.cfg)
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
            result = train.run(cfg, state, get_build(cfg.strategy), out_dir=self.out_dir)
        finally:
            distributed.shutdown()
        return result if state.is_main else None
