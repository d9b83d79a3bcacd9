"""Continuing a run (``--resume``) and taking its weights out (``--export``).

A checkpoint is layout-free (core.training.checkpoint), so ``--resume RUN_DIR`` starts from the saved
configuration and lets the user override how it runs: the layout (strategy, --gpus, --dp, --tp,
--nodes, schedule, split), how long (--steps / --epochs, also past the end of a finished run),
and where and how it is launched. What would change the training itself is refused in one line.
"""

from __future__ import annotations

import json
import os

from core.config import ConfigError, RunConfig
from core.models import describe

# what a checkpoint cannot carry over: another network, or another data order (the position counts
# global batches of the saved size and seed)
FIXED = ("model", "flavor", "dataset", "batch_size", "seed", "train_samples", "grad_accum")


def resume_config(run_dir: str, cfg: RunConfig, given: set[str]) -> RunConfig:
    """The saved configuration with the options the user gave on top (see the module docstring)."""
    import dataclasses

    from core.training.checkpoint import latest_checkpoint

    path = os.path.join(run_dir, "config.json")
    latest = latest_checkpoint(run_dir)
    if not os.path.exists(path):
        raise ConfigError(f"--resume {run_dir}: no config.json there; give a run folder made by jobs/submit.py")
    if latest is None:
        raise ConfigError(
            f"--resume {run_dir}: no checkpoint there (a run saves one with --checkpoint-every N, "
            "or when it is stopped by SIGUSR2)"
        )
    with open(path) as f:
        saved = RunConfig.from_dict(json.load(f))
    for name in FIXED:
        if name in given and getattr(cfg, name) != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"--resume {run_dir}: {flag} {getattr(cfg, name)} differs from the saved run's "
                f"{getattr(saved, name)}; a checkpoint continues the same training: start a new run "
                "(--init-from takes exported weights)"
            )
    if "out" in given and os.path.abspath(cfg.out) != os.path.abspath(run_dir):
        raise ConfigError(
            f"--resume {run_dir} continues in its own folder: drop --out {cfg.out} (or copy the run "
            "folder there and resume that)"
        )
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    changes = {name: getattr(cfg, name) for name in given & fields if name not in FIXED and name != "out"}
    if changes:  # every flag given is applied, and said so: nothing is dropped silently
        shown = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(changes.items()))
        print(f"resume: applying {shown} over the saved configuration", flush=True)
    resumed = dataclasses.replace(saved, out=os.path.abspath(run_dir), **changes)
    if "epochs" in given:
        resumed = dataclasses.replace(resumed, steps=None)
    if "steps" in given:
        resumed = dataclasses.replace(resumed, epochs=None)
    result = os.path.join(run_dir, "result.json")
    if os.path.exists(result):
        done = latest["position"]["step"]
        asked = resumed.steps
        if asked is None or asked <= done:
            raise ConfigError(
                f"--resume {run_dir}: that run finished at step {done}; add --steps N with N > {done} to continue it"
            )
    return resumed


def uncut_names(run_dir: str) -> dict[str, str]:
    """The run's model's names in the model it was cut from (torchvision's own), as the latest
    checkpoint's configuration names the model."""
    from core.training.checkpoint import latest_checkpoint

    with open(os.path.join(run_dir, "checkpoint", latest_checkpoint(run_dir)["folder"], "meta.json")) as f:
        saved = json.load(f)["config"]
    return describe(saved["model"], saved.get("flavor", "tiny")).uncut_names()


def export(run_dir: str, target: str, force: bool = False) -> int:
    """``--export RUN_DIR FILE``: the latest checkpoint's weights as one plain state dict."""
    from core.training.checkpoint import export_weights, latest_checkpoint

    if latest_checkpoint(run_dir) is None:
        raise ConfigError(f"--export {run_dir}: no checkpoint there (runs save one with --checkpoint-every N)")
    if os.path.exists(target) and not force:
        raise ConfigError(f"--export: {target} exists; add --force to replace it (nothing was written)")
    if os.path.isdir(target):
        raise ConfigError(f"--export: {target} is a folder; give a file name such as weights.pt")
    n = export_weights(run_dir, target, uncut_names(run_dir))
    print(f"exported {n} tensors of {run_dir}'s latest checkpoint to {target} (torch.load + load_state_dict)")
    return 0
