"""The command line of DESIGN.md section 2, DERIVED from core.config.RunConfig's fields.

Every training option is declared once, as a RunConfig field (name, type, default, choices, help);
the few that are actions of the submit command, not part of a run, are declared the same way in
``SubmitActions``. argparse errors and ConfigError both end as one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass

from core.config import RunConfig, flag_of, option
from core.config.options import parse_bytes


@dataclass
class SubmitActions:
    """What the submit command does with the run (not stored in config.json)."""

    dry_run: bool = option(False, "print what would be submitted (the sbatch script); submit nothing")
    no_wait: bool = option(False, "submit and return; results land in the run folder")
    resume: str | None = option(
        None,
        "continue a stopped run from its checkpoint, with the configuration it was started with",
        metavar="RUN_DIR",
    )
    export: list[str] | None = option(
        None,
        "write RUN_DIR's latest checkpoint as one plain state dict FILE (torch.load + load_state_dict)",
        metavar=("RUN_DIR", "FILE"),
        nargs=2,
    )
    attach: str | None = option(
        None,
        "follow the job already running for RUN_DIR (after the submit command was closed): its log, then its summary",
        metavar="RUN_DIR",
    )
    force: bool = option(False, "--export: replace FILE if it exists")
    compare: bool = option(False, "run mp and every pp schedule on the same model; one table, one PNG")
    plan: bool = option(
        False,
        "rank every layout this model can run on --gpus: predicted step time, samples/s, peak memory per "
        "device, fit and traffic per axis; best ten printed, plan.json in the run folder (jobs/plan/layouts.py)",
    )
    trials: int = option(
        0,
        "--plan/--auto: run the K best predicted layouts for a few steps each (--steps, default 10), add the "
        "measured step time and the prediction error, rank by measurement",
        metavar="K",
    )
    auto: bool = option(
        False, "plan (with --trials if given), then run the winner with the other flags; result.json names the plan"
    )
    device_memory: float | None = option(
        None,
        "--plan: bytes each device may use, e.g. 512M or 80G (default: 90%% of the GPU's; on CPU no limit)",
        parse=parse_bytes,
        metavar="SIZE",
    )
    link_rates: str | None = option(
        None,
        "--plan: link bandwidth and latency from a --validate run's validate.json (default on CPU: latency "
        "probed among --gpus gloo processes, bandwidth assumed; on GPU both assumed; plan.json says which)",
        metavar="FILE",
    )
    pytest: str | None = option(
        None,
        "submit 'pytest -m MARKER' as the job (e.g. gpu) to check a node; other training flags ignored",
        metavar="MARKER",
    )
    validate: bool = option(
        False,
        "node-validation job over --nodes (--gpus in all): devices, matmul rate, all-reduce and node-pair "
        "bandwidth/latency; table, validate.json, validate.png; exit 1 naming a bad node or link "
        "(jobs/validate/node_check.py)",
    )
    thresholds: list[str] = option(
        help="--validate: override a pass threshold, repeatable: matmul_gflops, allreduce_gbps, p2p_gbps or "
        "p2p_latency_ms=VALUE (defaults per device kind in jobs/validate/node_check.py)",
        flag="--threshold",
        metavar="KEY=VALUE",
        factory=list,
    )


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


def _number(flag: str, kind: type):
    what = "a whole number such as 4" if kind is int else "a number such as 1e-5"

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {what} (got {text!r})") from None

    return parse


def _zero_one(flag: str):
    def parse(text: str) -> bool:
        if text not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"{flag} takes 0 or 1 (got {text!r})")
        return text == "1"

    return parse


def _base_type(hint) -> type:
    """int for ``int | None``, list for ``list[str]``, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        hint = args[0]
    return typing.get_origin(hint) or hint


def add_options(parser: argparse.ArgumentParser, cls: type, suppress_defaults: bool = False) -> None:
    """One argparse option per dataclass field, from the field's declaration."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, flag_of(f)
        kind = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict = {"dest": f.name, "help": meta.get("help", "")}
        if meta.get("metavar") or meta.get("choices"):
            kw["metavar"] = meta.get("metavar") or "{" + ",".join(meta["choices"]) + "}"
        if kind is bool and default is False:
            kw["action"] = "store_true"
        elif kind is bool:  # on by default: --flag 0 turns it off
            kw.update(type=_zero_one(flag), metavar="{0,1}")
        elif kind is list and meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        elif kind is list and meta.get("parse") is None:
            kw["action"] = "append"
        else:
            kw["type"] = meta.get("parse") or (_number(flag, kind) if kind in (int, float) else str)
        kw["default"] = argparse.SUPPRESS if suppress_defaults else default
        parser.add_argument(flag, **kw)


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python jobs/submit.py",
        description="Train a model split over several devices (dp, mp, pp, tp) through submitit: Slurm when it "
        "answers, else the local executor; CPU with gloo where there is no GPU. Bad input: one line, exit 2.",
        formatter_class=DefaultsWhereSet,
    )
    add_options(p, RunConfig, suppress_defaults)
    add_options(p.add_argument_group("submit command"), SubmitActions, suppress_defaults)
    return p


def parse(argv: list[str] | None) -> tuple[RunConfig, SubmitActions, set[str]]:
    """The run's configuration, the command's actions, and the names of the options the user gave."""
    a = vars(build_parser().parse_args(argv))
    given = set(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    names = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in a.items() if k in names})
    actions = SubmitActions(**{k: v for k, v in a.items() if k not in names})
    return cfg, actions, given
