"""Typed run configuration: every option declared once, as data, with its plain checks.

Each field carries its help (and choices, flag name, parser where the type alone does not say) in
``option(...)``; jobs/cli/parser.py derives the command line from these fields, the printed configuration
and config.json come from ``to_dict``. Adding an option means adding one field here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from core.errors import ConfigError
from core.models.registry import describe

STRATEGIES = ("reference", "dp", "mp", "pp", "tp")
CLUSTERS = ("auto", "slurm", "local")
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("fp32", "bf16")
DP_MODES = ("fsdp", "ddp")
BALANCES = ("params", "time")


def option(
    default=None, help: str = "", *, choices=None, flag=None, parse=None, metavar=None, factory=None, nargs=None
):
    """A configuration field that is also a command-line option (its one declaration)."""
    meta = {"help": help, "choices": choices, "flag": flag, "parse": parse, "metavar": metavar, "nargs": nargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_split(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split takes blocks per stage like 2,1,3 (got {text!r})") from None


def parse_bytes(text: str) -> float:
    """A memory size: 512M, 80G, 1.5GiB or plain bytes (binary multiples)."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([kKmMgGtT]?)(?:i?[bB])?", text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"--device-memory takes a size like 512M or 80G (got {text!r})")
    return float(m.group(1)) * 1024 ** ("kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0)


@dataclass
class RunConfig:
    strategy: str = option(
        "mp",
        "how the model is split: reference (one device), dp (whole model per device, data parallel), mp, pp or tp",
        choices=STRATEGIES,
    )
    gpus: int = option(
        1,
        "devices of the whole job: dp x pp x tp processes (pp, tp), dp x stages (mp); "
        "on a host without GPU, CPU devices (mp) or gloo processes",
    )
    nodes: int = option(1, "nodes the job spans (Slurm)")
    dp: int | None = option(None, "data-parallel replicas, each on --gpus / --dp devices (default 1; dp: --gpus)")
    dp_mode: str | None = option(
        None,
        "how replicas keep gradients equal: fsdp (FSDP2 fully_shard) or ddp "
        "(DistributedDataParallel) (default: fsdp with tensor parallel, ddp otherwise)",
        choices=DP_MODES,
    )
    model: str = option(
        "mnist-cnn",
        "mnist-cnn (the notebook's network), gpt (decoder-only transformer), delay (timing model), "
        "torchvision:NAME (e.g. torchvision:resnet18, cut into blocks) or package.module:factory (your own)",
    )
    flavor: str = option(
        "tiny",
        "model size: gpt tiny/small/124m/356m/1.3b/2.7b, delay tiny/small/uneven/uneven-wide (mnist-cnn has one)",
    )
    dataset: str | None = option(
        None, "training data: mnist, synthetic, fakedata or package.module:factory (default: the model's own)"
    )
    data_dir: str = option("./data", "MNIST folder: downloaded there on the submitting host, read from there")
    epochs: int | None = option(
        None, "passes over the training set (default: the model's, mnist-cnn 2, others 1; exclusive with --steps)"
    )
    steps: int | None = option(None, "optimizer steps instead of epochs")
    batch_size: int | None = option(
        None, "GLOBAL batch, cut into --dp shards (default: the model's; mnist-cnn 128, gpt 8, delay 16)"
    )
    lr: float | None = option(
        None, "learning rate of the model's optimizer (default: the model's; mnist-cnn SGD 1e-3, gpt AdamW 3e-4)"
    )
    seed: int = option(0, "seeds weights, data order and dropout")
    train_samples: int | None = option(None, "train on the first N samples only")
    eval_samples: int | None = option(None, "evaluate on the first N held-out samples only")
    split: list[int] | None = option(
        None, "mp/pp: blocks per stage, e.g. 2,1,3 (default: chosen by --balance)", parse=parse_split
    )
    balance: str | None = option(
        None,
        "mp/pp: cut the blocks by params (equal parameter counts) or time (each block's forward and "
        "backward measured on the target device; default, unless --split gives the cut)",
        choices=BALANCES,
    )
    microbatches: int | None = option(None, "pp: micro-batches per replica's batch (default: 2 x stages)")
    schedule: str = option(
        "1f1b",
        "pp: gpipe, 1f1b, interleaved-1f1b, looped-bfs, interleaved-zero-bubble, "
        "zbv-zero-bubble, dualpipev (torch.distributed.pipelining's)",
    )
    tp: int = option(1, "tensor-parallel degree (tp: --gpus / --dp; pp: inside each stage)")
    sequence_parallel: bool = option(False, "tp, gpt: shard norms and activations on the sequence dimension")
    loss_parallel: bool = option(False, "tp, gpt: cross-entropy on vocabulary-sharded logits")
    grad_accum: int = option(1, "batches accumulated per optimizer step")
    dtype: str = option("fp32", "fp32 (TF32 off) or bf16 autocast", choices=DTYPES)
    compile: bool = option(False, "torch.compile each block in place (GPU speed)")
    check: bool = option(False, "compare every step's loss and every gradient with a single-device run (dropout off)")
    check_tol: float | None = option(None, "relative tolerance of --check (default: fp32 1e-5, bf16 2e-2)")
    cluster: str = option(
        "auto", "where the job runs: auto (Slurm when sinfo answers, else this host), slurm or local", choices=CLUSTERS
    )
    device: str = option("auto", "auto (cuda where present), cuda or cpu", choices=DEVICES)
    container: str | None = option(
        None, "Image each task runs in (Slurm): an Apptainer .sif, podman:IMAGE, docker:IMAGE or pyxis:IMAGE"
    )
    partition: str | None = option(None, "Slurm partition")
    account: str | None = option(None, "Slurm account")
    time: int = option(60, "job time limit in minutes (Slurm)")
    qos: str | None = option(None, "Slurm quality of service")
    constraint: str | None = option(None, "Slurm node features, e.g. h100")
    cpus_per_task: int | None = option(None, "CPUs per task (Slurm; default: Slurm's)")
    mem: str | None = option(None, "memory per node, Slurm syntax, e.g. 64G")
    kill_on_bad_exit: bool = option(True, "1: a failing rank ends the whole job at once (srun --kill-on-bad-exit)")
    slurm_opts: list[str] = option(
        help="further sbatch option, repeatable (e.g. --slurm-opt exclusive=true)",
        flag="--slurm-opt",
        metavar="KEY=VALUE",
        factory=list,
    )
    out: str | None = option(None, "run folder (default: runs/<strategy>-<time>/)")
    checkpoint_every: int | None = option(
        None, "save a checkpoint every N steps and at the end (torch.distributed.checkpoint; any layout resumes it)"
    )
    keep_checkpoints: int = option(2, "keep the newest K checkpoints")
    max_retries: int = option(
        2, "Slurm: requeue a job that fails after a checkpoint at most N times; it resumes from the checkpoint"
    )
    init_from: str | None = option(
        None, "start from the weights in FILE (a plain state dict, e.g. from --export) instead of the seed's"
    )
    dist_timeout_s: float = option(
        300.0,
        "seconds any collective or rendezvous may wait before the job fails",
        flag="--dist-timeout",
        metavar="SEC",
    )
    hang_timeout_s: float | None = option(
        None,
        "seconds without progress after which every rank writes what it is doing (action, peer, stack) "
        "into RUN/hang/ and the submit command shows one table (default: half of --dist-timeout, so the "
        "report is written while the ranks still wait)",
        flag="--hang-timeout",
        metavar="SEC",
    )
    log_every: int = option(20, "progress line every N steps")

    # ---- derived values -------------------------------------------------------------------
    # defaults that depend on the model are the model's own (core.models.base.BlockModel)
    def _model(self):
        return describe(self.model, self.flavor)

    @property
    def resolved_dataset(self) -> str:
        return self.dataset or self._model().default_dataset

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or self._model().default_batch_size

    @property
    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self._model().default_epochs

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else self._model().default_lr

    @property
    def resolved_tol(self) -> float:
        # fp32 with TF32 off: a different summation order (split matmuls, all-reduce) moves results
        # by a few ulps that grow through the layers: 1e-5 relative is what torch's own pipelining
        # tests allow. bf16 keeps 8 bits of mantissa (~4e-3 per rounding), so 2e-2 after a few layers.
        if self.check_tol is not None:
            return self.check_tol
        return 1e-5 if self.dtype == "fp32" else 2e-2

    @property
    def resolved_hang_timeout_s(self) -> float:
        return self.hang_timeout_s if self.hang_timeout_s is not None else self.dist_timeout_s / 2

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


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a configuration field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for the first mistake in the options themselves (choices, numbers, shell
    syntax, the data folder). What needs the model, the layout or the contract is checked above the
    configuration (jobs/plan/checks.py); what the submitting host has (GPUs, Slurm) by the launch plan.
    """

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for f in dataclasses.fields(RunConfig):  # choices, declared with each option
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        need(
            choices is None or value is None or value in choices,
            f"unknown {flag_of(f)} {value!r}: choose one of {', '.join(choices or ())}",
        )
    need(cfg.epochs is None or cfg.steps is None, "give --epochs or --steps, not both")
    for name in (
        "epochs",
        "steps",
        "batch_size",
        "grad_accum",
        "train_samples",
        "eval_samples",
        "time",
        "cpus_per_task",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
    ):
        v = getattr(cfg, name)
        need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1 (got {v})")
    need(cfg.max_retries >= 0, f"--max-retries must be 0 or more (got {cfg.max_retries})")
    need(cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), f"--lr must be a positive number (got {cfg.lr})")
    need(
        math.isfinite(cfg.dist_timeout_s) and cfg.dist_timeout_s > 0,
        f"--dist-timeout must be a positive number of seconds (got {cfg.dist_timeout_s})",
    )
    need(
        cfg.hang_timeout_s is None or (math.isfinite(cfg.hang_timeout_s) and cfg.hang_timeout_s > 0),
        f"--hang-timeout must be a positive number of seconds (got {cfg.hang_timeout_s})",
    )
    for name, example in (("data_dir", "./data"), ("out", "runs/my-run")):  # '' would mean the current folder
        v = getattr(cfg, name)
        need(v is None or v.strip() != "", f"--{name.replace('_', '-')} is empty: give a folder such as {example}")
    for opt in cfg.slurm_opts:
        need(
            "=" in opt and opt.split("=", 1)[0].strip() != "",
            f"--slurm-opt takes KEY=VALUE, like exclusive=true (got {opt!r})",
        )
    for name in ("partition", "account", "qos", "constraint", "mem", "container", "data_dir", "out", "init_from"):
        _refuse_shell(name, getattr(cfg, name))
    for opt in cfg.slurm_opts:
        _refuse_shell("slurm_opt", opt)
    need(
        cfg.check_tol is None or (math.isfinite(cfg.check_tol) and cfg.check_tol > 0),
        f"--check-tol must be a positive number such as 1e-5 (got {cfg.check_tol})",
    )

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
