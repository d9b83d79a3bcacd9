"""Preparing a run returns ONE value: the launch plan (configuration, layout, cluster, device, folder).

The executor and the task receive the plan; nothing is written back into the configuration and
nothing travels through a side channel. Everything that depends on the submitting host (does
Slurm answer, how many GPUs are here, can the data be fetched) is decided here, once.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from dataclasses import dataclass

from core.config import ConfigError, RunConfig, existing_parent
from core.data import DataError, Dataset, download_mnist, load_dataset, load_mnist
from core.files import torch_load
from core.models import build_model, describe
from core.models.base import to_block_names
from core.models.registry import dataset_factory, one_line, where
from core.parallel.layout import Layout
from jobs.plan import containers
from jobs.plan.cluster import resolve_cluster
from jobs.plan.strategies import validate_run


@dataclass(frozen=True)
class LaunchPlan:
    cfg: RunConfig
    layout: Layout
    cluster: str
    """slurm or local (auto is resolved)."""
    device: str
    """cuda or cpu; under Slurm with --device auto it stays auto: the compute node decides (a login
    node often has no GPU while the compute nodes do), and GPUs are requested for it."""
    run_dir: str
    data_source: str | None = None
    """Which MNIST the run trains on (None for synthetic data), decided on the submitting host."""
    container: dict | None = None
    """A podman/docker image's probe (jobs.plan.containers): engine, image, image_id, python, torch."""

    @property
    def requests_gpus(self) -> bool:
        return self.device != "cpu"


def resolve_device(cfg: RunConfig, cluster: str, cuda_count: int) -> str:
    if cfg.device == "cuda" and cluster == "local" and cuda_count == 0:
        raise ConfigError("--device cuda asked, but this host sees no CUDA GPU: use --device cpu (or auto)")
    if cfg.device != "auto":
        return cfg.device
    if cluster == "slurm":
        return "auto"
    return "cuda" if cuda_count > 0 else "cpu"


def check_host(plan: LaunchPlan, cuda_count: int) -> None:
    """What the chosen cluster can hold: one clear line, before anything starts."""
    cfg, layout = plan.cfg, plan.layout
    if plan.cluster == "local":
        if plan.device == "cuda" and layout.gpus_per_node > cuda_count:
            raise ConfigError(
                f"--gpus {cfg.gpus} asked, but this host has {cuda_count} GPU(s): lower --gpus, add --device cpu "
                "(the same layout on CPU processes), or submit to Slurm"
            )
        if cfg.nodes > 1:
            raise ConfigError(
                f"--nodes {cfg.nodes} needs Slurm; the local executor runs on this one host: use --nodes 1"
            )
        if cfg.container is not None:
            raise ConfigError(
                "--container runs tasks under Slurm (apptainer or pyxis): add --cluster slurm, or drop --container"
            )
    if cfg.container is not None and containers.parse(cfg.container).engine == "apptainer":
        if not os.path.isfile(cfg.container):
            raise ConfigError(
                f"--container {cfg.container} is not a file: give the .sif path (on a shared filesystem), "
                "podman:IMAGE, docker:IMAGE or pyxis:IMAGE"
            )


def run_folder(cfg: RunConfig, resuming: bool = False) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    from jobs.launch.run_folder import RUN_FILES

    folder = os.path.abspath(cfg.out or os.path.join("runs", f"{cfg.strategy}-{stamp}"))
    if os.path.isfile(folder):
        raise ConfigError(f"--out {folder} is a file: give a folder")
    # a resumed run continues its own folder (jobs.cli.resume checked it); any other run needs a new
    # one (jobs.launch.run_folder claims it atomically at submission; this is the early, clear refusal)
    if not resuming and any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES):
        raise ConfigError(
            f"--out {folder} already holds a run: continue it with --resume {folder}, or choose another "
            "folder (nothing is overwritten)"
        )
    parent = existing_parent(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {folder}: {parent} is not writable; choose a folder you can write to")
    return folder


def fetch_data(cfg: RunConfig) -> str | None:
    """The data is fetched (MNIST: downloaded) and made here, on the submitting host: a compute node
    never downloads, a dataset factory that fails says so in one line, and a batch larger than the
    training split (after --train-samples) is refused here, before any rank starts."""
    if cfg.resolved_dataset == "mnist":
        why = download_mnist(cfg.data_dir) if os.access(existing_parent(cfg.data_dir), os.W_OK) else "read-only"
        if why:
            print(f"note: MNIST could not be downloaded into {cfg.data_dir} ({why})", flush=True)
        data = load_mnist(cfg.data_dir)  # the count is the model's too: resizing keeps every image
    else:
        data = make_dataset(cfg)
    n = len(data.train.head(cfg.train_samples))
    per_step = cfg.resolved_batch_size * cfg.grad_accum
    if per_step > n:
        cut = f" (--train-samples {cfg.train_samples})" if n < len(data.train) else ""
        raise ConfigError(
            f"--batch-size {cfg.resolved_batch_size} x --grad-accum {cfg.grad_accum} is more than the "
            f"{n:,} training samples{cut} ({data.description}): lower --batch-size"
        )
    if cfg.resolved_dataset != "mnist":
        return None
    print(f"data: {data.description}", flush=True)
    return data.description


def make_dataset(cfg: RunConfig) -> Dataset:
    """Call the dataset's factory once, as a rank will (with the model built on the meta device:
    shapes only): whatever it raises becomes one line naming its file."""
    name = cfg.resolved_dataset
    try:
        return load_dataset(describe(cfg.model, cfg.flavor), name, cfg.data_dir, cfg.seed, cfg.resolved_batch_size)
    except (ConfigError, DataError):
        raise
    except Exception as e:
        raise ConfigError(
            f"--dataset {name}: the factory failed at {where(e, dataset_factory(name))}: {one_line(e)}"
        ) from None


def note_oversubscription(plan: LaunchPlan) -> None:
    """More CPU processes than cores on this host: allowed (it is how a laptop tries an 8-way
    layout), but said, because every rank then waits for a core and timings mean little."""
    if plan.cluster == "local" and plan.device == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if plan.layout.processes > cores:
            print(
                f"note: {plan.layout.processes} processes on {cores} CPU core(s): oversubscribed, so it runs "
                "slowly and its timings are not meaningful; fine for checking a layout",
                flush=True,
            )


def check_init_from(cfg: RunConfig) -> None:
    """--init-from must hold exactly the model's parameter names and shapes (in the block model's
    names or, for an export, the uncut model's): name the first mismatch. Buffers may be missing
    (exports of older versions held parameters only): they then keep their initial values."""
    import torch

    path = cfg.init_from
    if not os.path.isfile(path):
        raise ConfigError(f"--init-from {path} is not a file: give a state dict written by --export or torch.save")
    try:
        saved = torch_load(path)
    except ConfigError as e:  # unreadable, not a torch file, or more than tensors (weights only)
        raise ConfigError(f"--init-from {e}: give a state dict written by --export") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--init-from {path} holds a {type(saved).__name__}, not a state dict: use --export")
    with torch.device("meta"):  # names and shapes only: no memory for the weights
        model = build_model(cfg.model, cfg.flavor)
    saved = to_block_names(model, saved)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {n for n, _ in model.named_buffers()}
    for name, shape in expected.items():
        if name not in saved:
            if name in buffers:
                continue
            raise ConfigError(f"--init-from {path} has no {name!r} (the {cfg.model} {cfg.flavor} model needs it)")
        if tuple(saved[name].shape) != shape:
            raise ConfigError(
                f"--init-from {path}: {name!r} has shape {tuple(saved[name].shape)}, the model needs {shape}"
            )
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise ConfigError(f"--init-from {path} holds {extra[0]!r}, which the {cfg.model} {cfg.flavor} model has not")
    missing = sorted(set(expected) - set(saved))
    if missing:
        print(f"note: --init-from {path} has no buffers ({missing[0]}, ...): they start at their initial values")


def prepare(cfg: RunConfig, dry_run: bool = False, resuming: bool = False) -> LaunchPlan:
    """Validate, derive the layout, pick cluster and device, fetch data: the plan, or ConfigError/DataError.

    A dry run needs neither data nor Slurm's commands: it only renders what would be submitted."""
    import torch

    layout = validate_run(cfg)
    cluster = resolve_cluster(cfg)
    cuda_count = torch.cuda.device_count()
    if cfg.init_from:
        check_init_from(cfg)
    plan = LaunchPlan(cfg, layout, cluster, resolve_device(cfg, cluster, cuda_count), run_folder(cfg, resuming))
    check_host(plan, cuda_count)
    note_oversubscription(plan)
    if not dry_run and cfg.container is not None and containers.parse(cfg.container).engine in containers.ENGINES:
        # before Slurm, the data and the run folder: a mismatched image queues nothing
        plan = dataclasses.replace(plan, container=containers.probe(containers.parse(cfg.container)))
    if cluster == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ConfigError(
            "--cluster slurm, but sbatch is not on PATH: submit from a Slurm login node, or preview with --dry-run"
        )
    if not dry_run:
        plan = dataclasses.replace(plan, data_source=fetch_data(cfg))
    return plan
