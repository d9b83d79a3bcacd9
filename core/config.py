"""Typed run configuration: one dataclass, validated once before anything starts.

The command line (jobs/cli.py) maps onto these fields one for one; the resolved configuration is
printed at start and stored in result.json, so a run folder says exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

STRATEGIES = ("reference", "mp", "pp", "tp")
MODELS = ("mnist-cnn", "gpt", "delay")
DATASETS = ("mnist", "synthetic")
CLUSTERS = ("auto", "slurm", "local")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("fp32", "bf16")


class ConfigError(ValueError):
    """A user mistake: the message is one line saying what is wrong and how to fix it."""


@dataclass
class RunConfig:
    strategy: str = "mp"
    """Which style splits the model: reference (one device), mp, pp or tp."""
    gpus: int = 1
    """Devices the model is split over (per job). Without a GPU: CPU devices (mp) or gloo processes."""
    nodes: int = 1
    """Nodes the job spans (Slurm only)."""
    model: str = "mnist-cnn"
    """mnist-cnn (the notebook's network), gpt (small decoder-only transformer) or delay (timing model)."""
    flavor: str = "tiny"
    """Named size of gpt / delay (see core/models); ignored by mnist-cnn."""
    dataset: str | None = None
    """mnist or synthetic; None picks mnist for mnist-cnn, synthetic for the others."""
    data_dir: str = "./data"
    """Where MNIST is downloaded to (on the submitting host) and read from."""
    epochs: int | None = None
    """Passes over the training set; exclusive with steps. Neither given: one epoch."""
    steps: int | None = None
    """Optimizer steps; exclusive with epochs."""
    batch_size: int | None = None
    """Global batch size; None: 128 for mnist-cnn (the notebook's), 8 for gpt, 16 for delay."""
    lr: float | None = None
    """Learning rate; None: 1e-3 (SGD, the notebook's) for mnist-cnn and delay, 3e-4 (AdamW) for gpt."""
    seed: int = 0
    """Seeds weights, data order and dropout."""
    train_samples: int | None = None
    """Use only the first N training samples (quick runs, tests)."""
    eval_samples: int | None = None
    """Evaluate on only the first N held-out samples."""
    split: list[int] | None = None
    """mp/pp: blocks per stage, e.g. [2, 1, 3]; None balances by parameter count."""
    microbatches: int | None = None
    """pp: micro-batches per step; None: 2 x stages."""
    schedule: str = "1f1b"
    """pp: the torch.distributed.pipelining schedule, by name."""
    tp: int = 1
    """Tensor-parallel degree (tp: equals gpus; pp: inside each stage)."""
    sequence_parallel: bool = False
    """tp (gpt): shard norms and activations between blocks on the sequence dimension."""
    loss_parallel: bool = False
    """tp (gpt): keep logits vocabulary-sharded into a parallel cross-entropy."""
    grad_accum: int = 1
    """Accumulate gradients over this many batches before each optimizer step."""
    dtype: str = "fp32"
    """fp32 (TF32 off) or bf16 autocast."""
    compile: bool = False
    """torch.compile each block (in place, names kept); not with split-backward pp schedules."""
    check: bool = False
    """Compare every step's loss and every gradient with a single-device reference (dropout off)."""
    check_tol: float | None = None
    """Relative tolerance of the check; None picks by dtype (fp32 1e-5, bf16 2e-2)."""
    cluster: str = "auto"
    """auto (Slurm when sinfo answers, else local), slurm or local."""
    device: str = "auto"
    """auto (cuda when present), cuda or cpu."""
    container: str | None = None
    """Apptainer image (.sif) or pyxis:IMAGE each task runs in (Slurm)."""
    partition: str | None = None
    account: str | None = None
    time: int = 60
    """Job time limit in minutes (Slurm)."""
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    """CPUs per task (Slurm); None leaves Slurm's default."""
    mem: str | None = None
    """Memory per node, Slurm syntax (e.g. 64G)."""
    kill_on_bad_exit: bool = True
    """srun --kill-on-bad-exit: one failing rank ends the whole job at once."""
    slurm_opts: list[str] = field(default_factory=list)
    """Further sbatch options as KEY=VALUE (e.g. exclusive=true, reservation=r1)."""
    out: str | None = None
    """Run folder; None: runs/<strategy>-<time>/."""
    dist_timeout_s: float = 300.0
    """Timeout of every collective and of the rendezvous, in seconds (torch's default is 30 min)."""
    log_every: int = 20
    """Print a progress line every N steps."""
    extra: dict = field(default_factory=dict)
    """Resolved facts added at start (device kind, data source); not set by users."""

    # ---- derived values -------------------------------------------------------------------
    @property
    def resolved_dataset(self) -> str:
        return self.dataset or ("mnist" if self.model == "mnist-cnn" else "synthetic")

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or {"mnist-cnn": 128, "gpt": 8, "delay": 16}[self.model]

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (3e-4 if self.model == "gpt" else 1e-3)

    @property
    def resolved_tol(self) -> float:
        # fp32 with TF32 off: a different summation order (split matmuls, all-reduce) moves results
        # by a few ulps that grow through the layers: 1e-5 relative is what torch's own pipelining
        # tests allow. bf16 keeps 8 bits of mantissa (~4e-3 per rounding), so 2e-2 after a few layers.
        if self.check_tol is not None:
            return self.check_tol
        return 1e-5 if self.dtype == "fp32" else 2e-2

    @property
    def world_size(self) -> int:
        """Processes the job starts: one for reference and mp, one per device for pp and tp."""
        return 1 if self.strategy in ("reference", "mp") else self.gpus

    @property
    def pp_degree(self) -> int:
        return self.gpus // self.tp if self.strategy == "pp" else 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(
            dataset=self.resolved_dataset,
            batch_size=self.resolved_batch_size,
            lr=self.resolved_lr,
            check_tol=self.resolved_tol if self.check else self.check_tol,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def validate(cfg: RunConfig, cuda_count: int) -> None:
    """Raise ConfigError for the first user mistake found. Runs before any job is started.

    cuda_count is what the submitting host sees.
    """
    from core.models import FLAVORS, count_blocks

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(cfg.strategy in STRATEGIES, f"unknown --strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    need(cfg.model in MODELS, f"unknown --model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    need(
        cfg.model == "mnist-cnn" or cfg.flavor in FLAVORS[cfg.model],
        f"unknown --flavor {cfg.flavor!r} for {cfg.model}: choose one of {', '.join(FLAVORS[cfg.model])}",
    )
    n_blocks = count_blocks(cfg.model, cfg.flavor)
    need(
        cfg.dataset is None or cfg.dataset in DATASETS,
        f"unknown --dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}",
    )
    need(
        cfg.resolved_dataset == "mnist" or cfg.model != "mnist-cnn",
        "--model mnist-cnn trains on --dataset mnist (synthetic data is for gpt and delay)",
    )
    need(
        cfg.resolved_dataset != "mnist" or cfg.model == "mnist-cnn",
        f"--dataset mnist is for --model mnist-cnn; {cfg.model} uses --dataset synthetic",
    )
    need(cfg.cluster in CLUSTERS, f"unknown --cluster {cfg.cluster!r}: choose one of {', '.join(CLUSTERS)}")
    need(cfg.device in DEVICES, f"unknown --device {cfg.device!r}: choose one of {', '.join(DEVICES)}")
    need(cfg.dtype in DTYPES, f"unknown --dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    need(cfg.gpus >= 1, f"--gpus must be at least 1 (got {cfg.gpus})")
    need(cfg.nodes >= 1, f"--nodes must be at least 1 (got {cfg.nodes})")
    need(cfg.strategy != "reference" or cfg.gpus == 1, "--strategy reference runs on one device: use --gpus 1")
    need(cfg.epochs is None or cfg.steps is None, "give --epochs or --steps, not both")
    need(cfg.epochs is None or cfg.epochs >= 1, f"--epochs must be at least 1 (got {cfg.epochs})")
    need(cfg.steps is None or cfg.steps >= 1, f"--steps must be at least 1 (got {cfg.steps})")
    need(cfg.batch_size is None or cfg.batch_size >= 1, f"--batch-size must be at least 1 (got {cfg.batch_size})")
    need(cfg.grad_accum >= 1, f"--grad-accum must be at least 1 (got {cfg.grad_accum})")
    need(cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), f"--lr must be a positive number (got {cfg.lr})")
    need(cfg.time >= 1, f"--time is in minutes and must be at least 1 (got {cfg.time})")
    need(
        cfg.cpus_per_task is None or cfg.cpus_per_task >= 1,
        f"--cpus-per-task must be at least 1 (got {cfg.cpus_per_task})",
    )
    for opt in cfg.slurm_opts:
        need(
            "=" in opt and opt.split("=", 1)[0].strip() != "",
            f"--slurm-opt takes KEY=VALUE, like exclusive=true (got {opt!r})",
        )
    for name in ("partition", "account", "qos", "constraint", "mem", "container", "data_dir", "out"):
        _refuse_shell(name, getattr(cfg, name))
    for opt in cfg.slurm_opts:
        _refuse_shell("slurm_opt", opt)
    need(
        cfg.check_tol is None or (math.isfinite(cfg.check_tol) and cfg.check_tol > 0),
        f"--check-tol must be a positive number such as 1e-5 (got {cfg.check_tol})",
    )
    for name in ("train_samples", "eval_samples"):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {v})")

    # Devices: ask for what the host has, and say what it has.
    if cfg.device == "cuda":
        need(cuda_count > 0, "--device cuda asked, but this host sees no CUDA GPU: use --device cpu (or auto)")
    on_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda_count > 0)
    resolved_cluster = cfg.extra.get("cluster", cfg.cluster)
    if on_cuda and resolved_cluster == "local":
        per_node = cfg.gpus
        need(
            per_node <= cuda_count,
            f"--gpus {cfg.gpus} asked, but this host has {cuda_count} GPU(s): lower --gpus or submit to Slurm",
        )
    need(
        cfg.container is None or resolved_cluster == "slurm",
        "--container runs tasks under Slurm (apptainer or pyxis): add --cluster slurm, or drop --container",
    )
    need(
        cfg.container is None or cfg.container.startswith("pyxis:") or os.path.isfile(cfg.container),
        f"--container {cfg.container} is not a file: give the .sif path (on a shared filesystem) or pyxis:IMAGE",
    )
    need(
        cfg.nodes == 1 or resolved_cluster != "local",
        f"--nodes {cfg.nodes} needs Slurm; the local executor runs on this one host: use --nodes 1",
    )
    need(cfg.gpus % cfg.nodes == 0, f"--gpus {cfg.gpus} does not divide over --nodes {cfg.nodes}")

    # Stages: no more than there are blocks; an explicit split must describe every block.
    stages = cfg.gpus if cfg.strategy == "mp" else cfg.pp_degree
    if cfg.strategy in ("mp", "pp"):
        need(
            stages <= n_blocks,
            f"--gpus {cfg.gpus} gives {stages} stages, but {cfg.model} has only {n_blocks} blocks: "
            f"use at most {n_blocks}" + (" stages" if cfg.strategy == "pp" else ""),
        )
    if cfg.split is not None:
        need(cfg.strategy in ("mp", "pp"), "--split applies to --strategy mp or pp")
        need(all(s >= 1 for s in cfg.split), f"--split {_fmt(cfg.split)} holds a zero: every stage needs a block")
        need(
            sum(cfg.split) == n_blocks,
            f"--split {_fmt(cfg.split)} sums to {sum(cfg.split)}, but {cfg.model} has {n_blocks} blocks",
        )
    if cfg.strategy == "mp" and cfg.split is not None:
        need(len(cfg.split) == cfg.gpus, f"--split {_fmt(cfg.split)} has {len(cfg.split)} stages for --gpus {cfg.gpus}")
    need(cfg.tp >= 1, f"--tp must be at least 1 (got {cfg.tp})")
    if cfg.strategy == "tp":
        need(cfg.tp in (1, cfg.gpus), f"--strategy tp splits over all --gpus: drop --tp or set --tp {cfg.gpus}")
    elif cfg.strategy == "pp":
        need(cfg.gpus % cfg.tp == 0, f"--gpus {cfg.gpus} is not a multiple of --tp {cfg.tp}")
    else:
        need(cfg.tp == 1, "--tp applies to --strategy tp and pp")

    # The data folder must be usable before anything is queued.
    if cfg.resolved_dataset == "mnist":
        d = cfg.data_dir
        need(not os.path.isfile(d), f"--data-dir {d} is a file: give a folder (it is created if missing)")
        probe = existing_parent(d)
        need(
            os.access(probe, os.W_OK) or _has_mnist(d),
            f"--data-dir {d} is not writable: give a folder you can write to, or one that holds MNIST",
        )


SHELL_META = (";", "$(", "`", "\n", "\r", "&&", "||", "|", ">", "<")


def _refuse_shell(name: str, value: str | None) -> None:
    """Values end up in an sbatch script: refuse anything a shell would act on."""
    if value is not None and any(m in value for m in SHELL_META):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {value!r} holds shell syntax (; $( ` | < > or a newline): give a plain value")


def existing_parent(path: str) -> str:
    """The nearest folder of ``path`` that exists (itself if it does): where it would be created."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _has_mnist(d: str) -> bool:
    raw = os.path.join(d, "MNIST", "raw")
    return os.path.isdir(raw) and any(n.startswith("t10k-images") for n in os.listdir(raw))


def _fmt(split: list[int]) -> str:
    return ",".join(str(s) for s in split)
