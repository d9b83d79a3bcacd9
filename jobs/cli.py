"""The command line of DESIGN.md section 2, mapped onto core.config.RunConfig.

argparse errors and ConfigError both end as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from core.config import CLUSTERS, DATASETS, DEVICES, DTYPES, MODELS, STRATEGIES, RunConfig


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on a mistake; we print one line that says what to fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


class DefaultsWhereSet(argparse.HelpFormatter):
    """Show '(default: X)' only where there is a concrete default the help text does not already give."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _split(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split takes blocks per stage like 2,1,3 (got {text!r})") from None


def _float(name: str):
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number such as 1e-5 (got {text!r})") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python jobs/submit.py",
        description="Train a model split over several devices (mp, pp, tp) through submitit: Slurm when it "
        "answers, else the local executor; CPU with gloo where there is no GPU. Bad input: one line, exit 2.",
        formatter_class=DefaultsWhereSet,
    )
    c = RunConfig()
    p.add_argument("--strategy", default=c.strategy, help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument(
        "--gpus", type=int, default=c.gpus, help="devices the model is split over (CPU: devices or processes)"
    )
    p.add_argument("--nodes", type=int, default=c.nodes, help="nodes (Slurm only)")
    p.add_argument("--model", default=c.model, help=f"one of {', '.join(MODELS)}")
    p.add_argument(
        "--flavor", default=c.flavor, help="model size: gpt tiny/small/124m/356m/1.3b/2.7b, delay tiny/small"
    )
    p.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (default: by model)")
    p.add_argument("--data-dir", default=c.data_dir, help="MNIST folder (downloaded on the submitting host)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 1)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps instead of epochs")
    p.add_argument(
        "--batch-size", type=int, default=None, help="global batch (default: mnist-cnn 128, gpt 8, delay 16)"
    )
    p.add_argument("--lr", type=_float("--lr"), default=None, help="learning rate (default: 1e-3 SGD; gpt 3e-4 AdamW)")
    p.add_argument("--seed", type=int, default=c.seed)
    p.add_argument("--train-samples", type=int, default=None, help="train on the first N samples only")
    p.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N held-out samples only")
    p.add_argument(
        "--split", type=_split, default=None, help="mp/pp: blocks per stage, e.g. 2,1,3 (default: balance parameters)"
    )
    p.add_argument("--microbatches", type=int, default=None, help="pp: micro-batches per batch (default 2 x stages)")
    p.add_argument(
        "--schedule",
        default=c.schedule,
        help="pp: gpipe, 1f1b, interleaved-1f1b, looped-bfs, interleaved-zero-bubble, zbv-zero-bubble, dualpipev",
    )
    p.add_argument("--tp", type=int, default=c.tp, help="tensor-parallel degree (pp: inside each stage)")
    p.add_argument("--sequence-parallel", action="store_true", help="tp, gpt: sequence parallel norms/activations")
    p.add_argument("--loss-parallel", action="store_true", help="tp, gpt: cross-entropy on vocabulary-sharded logits")
    p.add_argument("--grad-accum", type=int, default=c.grad_accum, help="batches accumulated per optimizer step")
    p.add_argument("--dtype", default=c.dtype, help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (GPU speed)")
    p.add_argument("--check", action="store_true", help="compare loss and every gradient with a single-device run")
    p.add_argument(
        "--check-tol",
        type=_float("--check-tol"),
        default=None,
        help="relative tolerance of --check (default: fp32 1e-5, bf16 2e-2)",
    )
    p.add_argument("--cluster", default=c.cluster, help=f"one of {', '.join(CLUSTERS)}")
    p.add_argument("--device", default=c.device, help=f"one of {', '.join(DEVICES)}")
    p.add_argument("--container", default=None, help="Apptainer image (.sif) or pyxis:IMAGE (Slurm)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", type=int, default=c.time, help="time limit in minutes")
    p.add_argument("--qos", default=None, help="Slurm quality of service")
    p.add_argument("--constraint", default=None, help="Slurm node features, e.g. h100")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (Slurm)")
    p.add_argument("--mem", default=None, help="memory per node, Slurm syntax, e.g. 64G")
    p.add_argument(
        "--kill-on-bad-exit",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: a failing rank ends the whole job at once (srun --kill-on-bad-exit)",
    )
    p.add_argument(
        "--slurm-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further sbatch option, repeatable (e.g. --slurm-opt exclusive=true)",
    )
    p.add_argument(
        "--pytest",
        default=None,
        metavar="MARKER",
        help="submit 'pytest -m MARKER' as the job (e.g. gpu) to check a node; other training flags ignored",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<strategy>-<time>/)")
    p.add_argument(
        "--dist-timeout",
        type=_float("--dist-timeout"),
        default=c.dist_timeout_s,
        help="seconds any collective may wait before the job fails",
    )
    p.add_argument("--log-every", type=int, default=c.log_every, help="progress line every N steps")
    p.add_argument(
        "--compare", action="store_true", help="run mp and every pp schedule on the same model; one table, one PNG"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a stopped run from its checkpoint, with the configuration it was started with",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted; submit nothing")
    p.add_argument("--no-wait", action="store_true", help="submit and return; results land in the run folder")
    return p


def config_from_args(a: argparse.Namespace) -> RunConfig:
    return RunConfig(
        strategy=a.strategy,
        gpus=a.gpus,
        nodes=a.nodes,
        model=a.model,
        flavor=a.flavor,
        dataset=a.dataset,
        data_dir=a.data_dir,
        epochs=a.epochs,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        train_samples=a.train_samples,
        eval_samples=a.eval_samples,
        split=a.split,
        microbatches=a.microbatches,
        schedule=a.schedule,
        tp=a.tp,
        sequence_parallel=a.sequence_parallel,
        loss_parallel=a.loss_parallel,
        grad_accum=a.grad_accum,
        dtype=a.dtype,
        compile=a.compile,
        qos=a.qos,
        constraint=a.constraint,
        cpus_per_task=a.cpus_per_task,
        mem=a.mem,
        kill_on_bad_exit=bool(a.kill_on_bad_exit),
        slurm_opts=a.slurm_opt,
        check=a.check,
        check_tol=a.check_tol,
        cluster=a.cluster,
        device=a.device,
        container=a.container,
        partition=a.partition,
        account=a.account,
        time=a.time,
        out=a.out,
        dist_timeout_s=a.dist_timeout,
        log_every=max(1, a.log_every),
    )
