"""Checkpoints that outlive the layout: torch.distributed.checkpoint (DCP) with full-model names.

A checkpoint is a folder ``<run>/checkpoint/step-NNNNNNNN/`` written by ``dcp.save`` from every
rank: the model and optimizer state dicts of ``torch.distributed.checkpoint.state_dict`` (DTensor
and FSDP2 aware; the optimizer's flattened per parameter, so any layout can read any other's),
keyed by the full model's parameter names (``blocks.h0.attn.q.weight``) whatever the cut. Beside
them: ``meta.json`` (data position, losses so far, the layout and configuration it was saved
under) and each rank's RNG state. DCP reshards on load: a pp 2 run resumes as tp 2, dp 2 x pp 2,
mp 3 or reference, each rank reading just the slices it holds.

Atomic: every rank writes into ``step-N.partial/``; after a barrier rank 0 renames it to
``step-N/`` and then replaces ``latest.json`` (write aside, rename). On GPU the write runs in the
background (``dcp.async_save``): training pauses only for the copy to host memory (2.3x shorter
for gpt 1.3b on an H200, README) and the checkpoint is published when the write is done. A save
killed half-way leaves only a ``.partial`` folder, which is ignored and removed by the next save:
the last good checkpoint is never touched. ``--keep-checkpoints K`` keeps the newest K.

A stop is requested by a signal (core.training.stop: SIGUSR2 before the time limit, SIGTERM from scancel,
SIGINT from Ctrl-C). Ranks agree on it at step boundaries with one small all-reduce, so they all
save at the same step.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from core.errors import ConfigError
from core.files import read_json, torch_save_atomic
from core.parallel.distributed import DistState


def param_holder(params: list[tuple[str, nn.Parameter]], buffers: list[tuple[str, torch.Tensor]] = ()) -> nn.Module:
    """A module that holds exactly this rank's parameters and persistent buffers under their
    full-model names (the same tensor objects, so loading into it loads into the model): what DCP's
    state-dict helpers take, whatever wraps the real modules (a DDP wrapper, several pipeline
    stages on one rank)."""
    root = nn.Module()

    def parent(name: str) -> tuple[nn.Module, str]:
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if part not in m._modules:
                m.add_module(part, nn.Module())
            m = m._modules[part]
        return m, leaf

    for name, p in params:
        m, leaf = parent(name)
        m.register_parameter(leaf, p)
    for name, b in buffers:
        m, leaf = parent(name)
        m.register_buffer(leaf, b)
    return root


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flattened optimizer state: one key per parameter and field, so ranks of another layout each
    # find the entries of the parameters they hold (torchtitan does the same for pipelines)
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(holder: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # a stage without parameters (mnist-cnn's pool alone) has nothing to keep: torch refuses an empty
    # model or optimizer state dict; one with buffers but no parameters keeps just those
    has_params = next(holder.parameters(), None) is not None
    has_state = has_params or next(holder.buffers(), None) is not None
    return {
        "model": get_model_state_dict(holder, options=_options()) if has_state else {},
        "optim": get_optimizer_state_dict(holder, opt, options=_options()) if has_params else {},
    }


def checkpoint_problem(folder: str) -> str | None:
    """Why the checkpoint in ``folder`` cannot be loaded, in one line, or None when it is intact:
    its meta.json reads and holds a position, DCP's index (``.metadata``) reads, and every file the
    index lists is there and at least as long as the bytes it records. Checked on the submitting
    host before a resume, so a truncated or deleted shard is found in a second, not in the job."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isdir(folder):
        return f"{folder} is missing"
    try:
        meta = read_json(os.path.join(folder, "meta.json"))
    except ConfigError as e:
        return str(e)
    if not isinstance(meta.get("position"), dict) or "step" not in meta["position"]:
        return f"{os.path.join(folder, 'meta.json')} holds no position (step)"
    index = os.path.join(folder, ".metadata")
    try:
        storage = FileSystemReader(folder).read_metadata().storage_data or {}
    except Exception as e:  # missing, truncated or not DCP's pickle: torch raises many kinds
        return f"{index} cannot be read ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) < size:
            return f"{path} is truncated ({os.path.getsize(path):,} of {size:,} bytes)"
    return None


def _steps(ckpt_dir: str) -> list[str]:
    """The published step folders (not a save's ``.partial``), newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = (n for n in os.listdir(ckpt_dir) if n.startswith("step-") and not n.endswith(".partial"))
    return sorted(names, reverse=True)


def choose_checkpoint(run_dir: str) -> tuple[dict | None, str | None]:
    """The checkpoint a resume loads, as latest.json describes one (folder, position, layout), and a
    one-line note when it is not latest.json's own: latest.json's checkpoint when it is intact,
    else the newest intact one beside it. (None, None) for a run without checkpoints; ConfigError
    naming the broken file when there are checkpoints but none is intact."""
    ckpt_dir = os.path.join(run_dir, "checkpoint")
    latest_path = os.path.join(ckpt_dir, "latest.json")
    named, problem = None, None
    if os.path.exists(latest_path):
        try:
            latest = read_json(latest_path)
            named = latest["folder"]
            if not isinstance(named, str) or not named:
                raise KeyError("folder")
        except (ConfigError, KeyError) as e:
            problem = str(e) if isinstance(e, ConfigError) else f"{latest_path} names no checkpoint folder"
        else:
            problem = checkpoint_problem(os.path.join(ckpt_dir, named))
            if problem is None:
                return latest, None
    for name in _steps(ckpt_dir):
        if name == named or checkpoint_problem(os.path.join(ckpt_dir, name)) is not None:
            continue
        meta = read_json(os.path.join(ckpt_dir, name, "meta.json"))
        entry = {"folder": name, "position": meta["position"], "layout": meta.get("layout")}
        why = problem or f"{latest_path} is missing"
        return entry, f"the latest checkpoint is broken ({why}): using {name}, the newest intact one"
    if problem is not None:
        raise ConfigError(f"no intact checkpoint in {ckpt_dir}: {problem}")
    return None, None


def latest_checkpoint(run_dir: str) -> dict | None:
    """The checkpoint a resume would load (see choose_checkpoint), or None without an intact one."""
    try:
        return choose_checkpoint(run_dir)[0]
    except ConfigError:
        return None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, run_dir: str, state: DistState, keep: int | None = None) -> None:
        self.run_dir = run_dir
        self.dir = os.path.join(run_dir, "checkpoint")
        self.state = state
        self.keep = keep
        self._pending: tuple | None = None
        """The save not yet published: (async future or None, step folder name, meta)."""

    def exists(self) -> bool:
        # a broken checkpoint with no intact one beside it raises (naming the file) rather than
        # silently training from scratch over the run
        return choose_checkpoint(self.run_dir)[0] is not None

    def latest_folder(self) -> str:
        return os.path.join(self.dir, choose_checkpoint(self.run_dir)[0]["folder"])

    def save(
        self,
        params: list,
        opt: torch.optim.Optimizer,
        position: dict,
        losses: list[float],
        config: dict,
        background: bool = False,
        buffers: list = (),
    ) -> str:
        """Write a checkpoint of this step from every rank (a collective); returns its folder.

        ``background``: torch's ``dcp.async_save``: the call returns once the state is copied to
        host memory and the files are written while training goes on; ``finish()`` (called by the
        next save, and by the training loop at the end) waits and publishes. Until then
        ``latest.json`` names the previous checkpoint."""
        import torch.distributed.checkpoint as dcp

        self.finish()
        name = f"step-{position['step']:08d}"
        partial = os.path.join(self.dir, name + ".partial")
        if self.state.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # a save that died earlier at this step
            os.makedirs(partial)
        _barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(partial, f"rng-rank{self.state.rank}.pt"))
        meta = {
            "position": position,
            "losses": losses,
            "layout": self.state.layout.to_dict(),
            "config": config,
            "buffers": True,  # persistent buffers are saved (checkpoints written before that hold none)
        }
        state = _state_dicts(param_holder(params, buffers), opt)
        if background:
            self._pending = (dcp.async_save(state, checkpoint_id=partial), name, meta)
            return os.path.join(self.dir, name)
        dcp.save(state, checkpoint_id=partial, no_dist=not dist.is_initialized())
        self._pending = (None, name, meta)
        return self.finish()

    def finish(self) -> str | None:
        """Wait for the save in flight (if any) and publish it: every rank's files are complete
        (barrier) before rank 0 renames the folder and replaces latest.json. A collective."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        future, name, meta = pending
        if future is not None:
            future.result()
        _barrier()
        final, partial = os.path.join(self.dir, name), os.path.join(self.dir, name + ".partial")
        if self.state.is_main:
            with open(os.path.join(partial, "meta.json"), "w") as f:
                json.dump(meta, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            tmp = os.path.join(self.dir, "latest.json.tmp")
            with open(tmp, "w") as f:
                json.dump({"folder": name, "position": meta["position"], "layout": meta["layout"]}, f)
            os.replace(tmp, os.path.join(self.dir, "latest.json"))
            self._prune(name)
        _barrier()
        return final

    def _prune(self, newest: str) -> None:
        """Remove leftovers of interrupted saves, and checkpoints beyond the newest ``keep``."""
        names = sorted(n for n in os.listdir(self.dir) if n.startswith("step-"))
        for n in names:
            if n.endswith(".partial"):
                shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)
        done = [n for n in names if not n.endswith(".partial")]
        if self.keep:
            for n in done[: -self.keep]:
                if n != newest:
                    shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)

    @torch.no_grad()
    def load_state(
        self, params: list, opt: torch.optim.Optimizer, folder: str | None = None, buffers: list = ()
    ) -> None:
        """Weights, buffers and optimizer state of ``params`` and ``buffers`` (any subset of the
        model, sharded or whole, e.g. the parity check's single-device copy) from ``folder``
        (default: the latest checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        folder = folder or self.latest_folder()
        with open(os.path.join(folder, "meta.json")) as f:
            has_buffers = json.load(f).get("buffers", False)
        if buffers and not has_buffers:
            if self.state.is_main:
                print(f"note: {folder} was saved without buffers (an older version): they keep their initial values")
            buffers = ()
        holder = param_holder(params, buffers)
        state = _state_dicts(holder, opt)
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
        # the saved param groups carry the saving run's kernel choice (fused on plain CUDA tensors);
        # this layout's optimizer keeps its own (fused refuses TP's mix of DTensors and tensors)
        kernels = [{k: g[k] for k in IMPLEMENTATION_FLAGS if k in g} for g in opt.param_groups]
        if state["model"]:
            set_model_state_dict(holder, state["model"], options=_options())
            set_optimizer_state_dict(holder, opt, state["optim"], options=_options())
        for group, flags in zip(opt.param_groups, kernels):
            group.update(flags)

    @torch.no_grad()
    def load(self, params: list, opt: torch.optim.Optimizer, buffers: list = ()) -> tuple[dict, list[float], dict]:
        """Restore this rank's parameters, buffers and optimizer state from the latest checkpoint,
        whatever layout wrote it, and its random state. Returns (data position, losses so far, the
        saved meta)."""
        folder = self.latest_folder()
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        self.load_state(params, opt, folder, buffers)
        # same layout: each rank its own random state (bit-for-bit resume); another layout: rank 0's
        same = meta["layout"] == self.state.layout.to_dict()
        path = os.path.join(folder, f"rng-rank{self.state.rank if same else 0}.pt")
        if os.path.exists(path):
            rng = torch.load(path, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return meta["position"], meta["losses"], meta


def export_weights(run_dir: str, target: str, names: dict[str, str] | None = None) -> int:
    """The latest checkpoint's model (parameters and persistent buffers) as ONE plain state dict
    (torch.save), loadable with ``model.load_state_dict(torch.load(target), strict=True)`` into the
    uncut model; ``names`` renames keys to that model's (BlockModel.uncut_names). Returns the
    tensor count."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = os.path.join(run_dir, "checkpoint", choose_checkpoint(run_dir)[0]["folder"])
    with tempfile.TemporaryDirectory() as tmp:
        whole = os.path.join(tmp, "whole.pt")
        dcp_to_torch_save(folder, whole)
        sd = torch.load(whole, weights_only=False)
    model = sd["model"] if "model" in sd else {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    names = names or {}
    model = {names.get(k, k): v.detach().cpu().contiguous() for k, v in model.items()}
    torch_save_atomic(model, target)  # a read-only or full target folder: one line naming it
    return len(model)
