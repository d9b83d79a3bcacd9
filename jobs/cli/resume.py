"""Continuing a run (``--resume``) and taking its weights out (``--export``).

A checkpoint is layout-free (core.training.checkpoint), so ``--resume RUN_DIR`` starts from the saved
configuration and lets the user override how it runs: the layout (strategy, --gpus, --dp, --tp,
--nodes, schedule, split), how long (--steps / --epochs, also past the end of a finished run),
and where and how it is launched. What would change the training itself is refused in one line.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing

from core.config import ConfigError, RunConfig
from core.files import read_json
from core.models import describe
from core.training.checkpoint import choose_checkpoint, export_weights

# what a checkpoint cannot carry over: another network, or another data order (the position counts
# global batches of the saved size and seed)
FIXED = ("model", "flavor", "dataset", "batch_size", "seed", "train_samples", "grad_accum")


def wrong_type(saved: dict) -> str | None:
    """The first field of a saved configuration whose value is not of its declared type (a
    hand-edited config.json): said here, not as a comparison failing deep in the layout."""
    hints = typing.get_type_hints(RunConfig)
    for name, value in saved.items():
        if name not in hints:
            continue  # a field of another version: RunConfig.from_dict drops it
        hint = hints[name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = tuple(typing.get_origin(k) or k for k in (typing.get_args(hint) if union else (hint,)))
        if float in kinds:
            kinds += (int,)  # JSON writes 300.0 as 300 only by hand, but it means the same
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"{name} is {value!r}"
    return None


def resume_config(run_dir: str, cfg: RunConfig, given: set[str]) -> RunConfig:
    """The saved configuration with the options the user gave on top (see the module docstring).
    Reads only: a refused resume leaves the folder as it was."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--resume {run_dir}: no config.json there; give a run folder made by jobs/submit.py")
    try:
        latest, note = choose_checkpoint(run_dir)  # every shard of it there, at its recorded size
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: {e}") from None
    if latest is None:
        raise ConfigError(
            f"--resume {run_dir}: no checkpoint there (a run saves one with --checkpoint-every N, "
            "or when it is stopped by SIGUSR2)"
        )
    try:
        saved_dict = read_json(path, "a run's configuration")
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: {e}") from None
    wrong = wrong_type(saved_dict)
    if wrong:
        raise ConfigError(f"--resume {run_dir}: {path} is not a run's configuration ({wrong})")
    saved = RunConfig.from_dict(saved_dict)
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
    if note:
        print(f"resume: {note}", flush=True)
    return resumed


def uncut_names(run_dir: str) -> dict[str, str]:
    """The run's model's names in the model it was cut from (torchvision's own), as the latest
    checkpoint's configuration names the model."""
    latest, _ = choose_checkpoint(run_dir)
    saved = read_json(os.path.join(run_dir, "checkpoint", latest["folder"], "meta.json")).get("config")
    if not isinstance(saved, dict) or "model" not in saved:
        raise ConfigError(f"{run_dir}/checkpoint/{latest['folder']}/meta.json names no model")
    return describe(saved["model"], saved.get("flavor", "tiny")).uncut_names()


def export(run_dir: str, target: str, force: bool = False) -> int:
    """``--export RUN_DIR FILE``: the latest checkpoint's weights as one plain state dict."""
    try:
        latest, note = choose_checkpoint(run_dir)
    except ConfigError as e:
        raise ConfigError(f"--export {run_dir}: {e}") from None
    if latest is None:
        raise ConfigError(f"--export {run_dir}: no checkpoint there (runs save one with --checkpoint-every N)")
    if os.path.isdir(target):
        raise ConfigError(f"--export: {target} is a folder; give a file name such as weights.pt")
    if os.path.exists(target) and not force:
        raise ConfigError(f"--export: {target} exists; add --force to replace it (nothing was written)")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ConfigError(f"--export: {parent} does not exist; create it first (nothing was written)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--export: {parent} is not writable; choose a folder you can write to")
    if note:
        print(f"export: {note}", flush=True)
    n = export_weights(run_dir, target, uncut_names(run_dir))
    print(f"exported {n} tensors of {run_dir}'s latest checkpoint to {target} (torch.load + load_state_dict)")
    return 0
