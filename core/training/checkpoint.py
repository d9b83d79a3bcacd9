"""Checkpoints that outlive the layout: torch.distributed.checkpoint (DCP) with full-model names.

A checkpoint is a folder ``<run>/checkpoint/step-NNNNNNNN/`` written by ``dcp.save`` from every
rank: the model and optimizer state dicts of ``torch.distributed.checkpoint.state_dict`` (DTensor
and FSDP2 aware; the optimizer's flattened per parameter, so any layout can read any other's),
keyed by the full model's parameter names (``blocks.h0.attn.q.weight``) whatever the cut. Beside
them: ``meta.json`` (data position, losses so far, the layout and configuration it was saved
under) and each rank's RNG state. DCP reshards on load: a pp 2 run resumes as tp 2, dp 2 x pp 2,
mp 3 or reference, each rank reading just the slices it holds.

Atomic: every rank writes into ``step-N.partial/``; after a barrier rank 0 renames it to
``step-N/`` and then replaces ``latest.json`` (write aside, rename). The bytes move as
core.training.checkpoint_io says: a copy into host buffers allocated once and reused (page-locked
on CUDA), then several writer threads per rank. On GPU the write runs in the background: training
pauses only for that copy, a writer thread writes and publishes while training goes on, and the
next save waits for it only if it is still running. A save killed half-way leaves only a
``.partial`` folder, which is ignored and removed by the next save: the last good checkpoint is
never touched. ``--keep-checkpoints K`` keeps the newest K.

A stop is requested by a signal (core.training.stop: SIGUSR2 before the time limit, SIGTERM from scancel,
SIGINT from Ctrl-C). Ranks agree on it at step boundaries with one small all-reduce, so they all
save at the same step.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from core.errors import ConfigError
from core.files import read_json, torch_save_atomic
from core.parallel.distributed import DistState
from core.training import checkpoint_io


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


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _agree(flag: bool, state: DistState) -> bool:
    """True on every rank only if ``flag`` is True on every rank (one small all-reduce)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=state.device if state.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


TRASH = ".pruned-"
"""The name prefix under which a pruned checkpoint waits for its deletion."""

PHASES = ("state_dict_s", "stage_s", "files_s", "publish_s")


def _one_or_list(values: list) -> object:
    """One value where every save paid the same, else the list per save."""
    return values[0] if values and all(v == values[0] for v in values) else values


class Checkpointer:
    def __init__(
        self, run_dir: str, state: DistState, keep: int | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.dir = os.path.join(run_dir, "checkpoint")
        self.state = state
        self.keep = keep
        self.log = log or (lambda msg: print(msg, flush=True) if state.is_main else None)
        self._stage = checkpoint_io.HostStage(pinned=state.device.type == "cuda" and torch.cuda.is_available())
        self._stage_ok: bool | None = None
        """Whether this host holds a staged copy of every local rank's state (agreed by all ranks)."""
        self._pool: ThreadPoolExecutor | None = None
        self._group = None
        """A gloo group of its own for background writes: their collectives never meet training's."""
        self._pending: tuple | None = None
        """The save in flight: (future of its write and publish, step folder name, step)."""
        self._saves: list[dict] = []
        self._deleter: ThreadPoolExecutor | None = None
        """Deletes pruned checkpoints off the save's path (joined at exit, like every pool)."""
        self.load_s: float | None = None
        self.load_files_s: float | None = None
        """Of the load, the reading of the files (the rest: planning, the copy to the device)."""

    def exists(self) -> bool:
        # a broken checkpoint with no intact one beside it raises (naming the file) rather than
        # silently training from scratch over the run
        return choose_checkpoint(self.run_dir)[0] is not None

    def latest_folder(self) -> str:
        return os.path.join(self.dir, choose_checkpoint(self.run_dir)[0]["folder"])

    def summary(self) -> dict:
        """What the saves and the load of this run cost, for result.json's ``checkpoints``."""
        done = [s for s in self._saves if "save_s" in s]
        return {
            "saves": len(done),
            "bytes_per_save": _one_or_list([s["bytes"] for s in done]),
            "save_s": [round(s["save_s"], 3) for s in done],
            "pause_s": [round(s["pause_s"], 3) for s in done],
            "background": [s["background"] for s in done],
            "load_s": None if self.load_s is None else round(self.load_s, 3),
            "load_files_s": None if self.load_files_s is None else round(self.load_files_s, 3),
            # where each save's time went: state dict assembly, the host copy, the files, the publish
            "phases_s": {k: [round(s["phases"].get(k, 0.0), 3) for s in done] for k in PHASES},
            "host_staging_bytes": self._stage.nbytes,
        }

    def _staging_fits(self, state: dict) -> bool:
        """Whether a host copy of this rank's state fits beside the other ranks' of this host; says
        once, in one line, what it costs or that saves block instead."""
        if self._stage_ok is None:
            need = checkpoint_io.state_bytes(state)
            local = max(1, min(self.state.world_size, torch.cuda.device_count() if self._stage.pinned else 1))
            avail = checkpoint_io.host_memory_available()
            fits = _agree(need * local <= 0.8 * avail, self.state)  # 20% left to the data loaders and the OS
            kind = "page-locked" if self._stage.pinned else "plain"
            if fits:
                self.log(
                    f"checkpoint staging: {need / 2**30:.2f} GiB of {kind} host memory per rank, allocated once "
                    "and reused: a save pauses training only for the copy"
                )
            else:
                self.log(
                    f"checkpoint: no room for a host copy of the state ({need * local / 2**30:.1f} GiB for "
                    f"{local} rank(s), {avail / 2**30:.1f} GiB available): saves block training instead"
                )
            self._stage_ok = fits
        return self._stage_ok

    def _background_group(self):
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.state.timeout_s))
        return self._group

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

        ``background``: the state is copied into host buffers (allocated once, page-locked on CUDA)
        and the call returns; a writer thread writes the files and publishes the checkpoint while
        training goes on. A save waits for the previous one only if it is still being written (and
        says so). Until it is published ``latest.json`` names the previous checkpoint."""
        t0 = time.perf_counter()
        step = position["step"]
        if self._pending is not None and not self._pending[0].done():
            self.log(f"checkpoint: waiting for the write of step {self._pending[2]} before saving step {step}")
        self.finish()
        name = f"step-{step:08d}"
        rng = {"cpu": torch.get_rng_state()}  # copies, taken now: training moves them on
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        meta = {
            "position": position,
            "losses": losses,
            "layout": self.state.layout.to_dict(),
            "config": config,
            "buffers": True,  # persistent buffers are saved (checkpoints written before that hold none)
        }
        state = _state_dicts(param_holder(params, buffers), opt)
        phases = {"state_dict_s": time.perf_counter() - t0}
        # on CUDA even a blocking save stages first: a page-locked copy runs at tens of GiB/s where
        # DCP's own copy to pageable memory ran at ~1 GiB/s; on CPU the tensors are host memory already
        staged = background or self._stage.pinned
        if staged and not self._staging_fits(state):
            background = staged = False
        record = {"step": step, "background": background, "phases": phases}
        self._saves.append(record)
        t = time.perf_counter()
        data = self._stage.stage(state) if staged else state
        phases["stage_s"] = time.perf_counter() - t
        if background:
            group = self._background_group()
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            future = self._pool.submit(self._write_and_publish, data, rng, name, meta, group, record, t0)
            self._pending = (future, name, step)
            record["pause_s"] = time.perf_counter() - t0
            return os.path.join(self.dir, name)
        final = self._write_and_publish(data, rng, name, meta, None, record, t0)
        record["pause_s"] = record["save_s"]
        return final

    def _write_and_publish(self, data: dict, rng: dict, name: str, meta: dict, group, record: dict, t0: float) -> str:
        """The files, then the publish: in the writer thread for a background save (its collectives
        on the group of its own), in line for a blocking one (``group`` None: the default group).
        Every file system call is here, so a background save's pause is the host copy alone (a
        small write can wait seconds behind a disk busy trimming a pruned checkpoint)."""
        t = time.perf_counter()
        partial = os.path.join(self.dir, name + ".partial")
        if self.state.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # a save that died earlier at this step
            os.makedirs(partial)
        _barrier(group)
        torch.save(rng, os.path.join(partial, f"rng-rank{self.state.rank}.pt"))
        checkpoint_io.write(data, partial, group)
        record["phases"]["files_s"] = time.perf_counter() - t
        t = time.perf_counter()
        final = self._publish(name, meta, group, record)
        record["phases"]["publish_s"] = time.perf_counter() - t
        record["save_s"] = time.perf_counter() - t0
        return final

    def _publish(self, name: str, meta: dict, group, record: dict) -> str:
        """Every rank's files are complete (barrier) before rank 0 renames the folder and replaces
        latest.json. A collective over ``group`` (None: the default group)."""
        _barrier(group)
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
        record["bytes"] = checkpoint_io.folder_bytes(final) if self.state.is_main else 0
        _barrier(group)
        return final

    def finish(self) -> str | None:
        """Wait for the save in flight (if any): when this returns it is published. A collective."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return pending[0].result()

    def _prune(self, newest: str) -> None:
        """Remove leftovers of interrupted saves, and checkpoints beyond the newest ``keep``: moved
        aside at once (a rename), deleted by a thread of their own. Unlinking gigabytes is not free
        (on a disk mounted with ``discard`` each file's blocks are trimmed as it goes) and the new
        checkpoint is already published, so training need not wait for it."""
        entries = os.listdir(self.dir)
        names = sorted(n for n in entries if n.startswith("step-"))
        done = [n for n in names if not n.endswith(".partial")]
        doomed = [n for n in names if n.endswith(".partial")]
        if self.keep:
            doomed += [n for n in done[: -self.keep] if n != newest]
        aside = [n for n in entries if n.startswith(TRASH)]  # an earlier process's
        for n in doomed:
            aside.append(f"{TRASH}{n}-{time.time_ns()}")
            os.replace(os.path.join(self.dir, n), os.path.join(self.dir, aside[-1]))
        self._deleter = self._deleter or ThreadPoolExecutor(1, thread_name_prefix="checkpoint-deleter")
        for n in aside:
            self._deleter.submit(shutil.rmtree, os.path.join(self.dir, n), True)

    @torch.no_grad()
    def load_state(
        self,
        params: list,
        opt: torch.optim.Optimizer,
        folder: str | None = None,
        buffers: list = (),
        staged: bool = False,
    ) -> None:
        """Weights, buffers and optimizer state of ``params`` and ``buffers`` (any subset of the
        model, sharded or whole, e.g. the parity check's single-device copy) from ``folder``
        (default: the latest checkpoint). ``staged``: read through the host buffers that later
        saves reuse (page-locked on CUDA, so the copy to the device is not the bottleneck)."""
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
        via_host = staged and self._stage.pinned and self._staging_fits(state)
        target = self._stage.ensure(state)[0] if via_host else state
        t = time.perf_counter()
        checkpoint_io.read(target, folder)
        self.load_files_s = time.perf_counter() - t
        if via_host:
            state = self._stage.restore(target, state)
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
        saved meta); ``load_s`` holds how long it took."""
        t0 = time.perf_counter()
        entry, note = choose_checkpoint(self.run_dir)
        if note:  # latest.json's checkpoint was broken after the submission (a requeued job finds it)
            self.log(f"resume: {note}")
        folder = os.path.join(self.dir, entry["folder"])
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        self.load_state(params, opt, folder, buffers, staged=True)
        # same layout: each rank its own random state (bit-for-bit resume); another layout: rank 0's
        same = meta["layout"] == self.state.layout.to_dict()
        path = os.path.join(folder, f"rng-rank{self.state.rank if same else 0}.pt")
        if os.path.exists(path):
            rng = torch.load(path, weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.load_s = time.perf_counter() - t0
        return meta["position"], meta["losses"], meta


def export_weights(run_dir: str, target: str, names: dict[str, str] | None = None) -> int:
    """The latest checkpoint's model (parameters and persistent buffers) as ONE plain state dict
    (torch.save), loadable with ``model.load_state_dict(torch.load(target), strict=True)`` into the
    uncut model; ``names`` renames keys to that model's (BlockModel.uncut_names). Returns the
    tensor count."""
    folder = os.path.join(run_dir, "checkpoint", choose_checkpoint(run_dir)[0]["folder"])
    sd = checkpoint_io.read_whole(folder)
    model = sd["model"] if "model" in sd else {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    names = names or {}
    model = {names.get(k, k): v.detach().cpu().contiguous() for k, v in model.items()}
    torch_save_atomic(model, target)  # a read-only or full target folder: one line naming it
    return len(model)
