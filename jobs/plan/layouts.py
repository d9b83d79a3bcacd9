"""Every layout the suite could run for one model on --gpus devices, each checked as a run would be.

Candidates are generated from the styles' degrees (dp x stages for mp, dp x pp x tp for pp, dp x tp
for tp), the pipeline schedules and micro-batch counts, the dp modes and sequence parallel; then
each goes through the same checks a submitted run goes through (``jobs.plan.strategies.validate_run``:
the options, the model and its layout, the style's own), so a candidate that cannot run is
excluded with the line the user would have seen. Options the user gave pin their axis (``--plan
--strategy pp --schedule 1f1b`` ranks 1F1B pipelines only).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from core.config import ConfigError, RunConfig
from core.parallel.layout import Layout
from core.parallel.pipeline_schedules import SCHEDULES
from jobs.plan.strategies import validate_run

# the axes a candidate sets; a user's option among these pins it
AXES = ("strategy", "dp", "tp", "schedule", "microbatches", "dp_mode", "sequence_parallel", "split")


@dataclass
class Candidate:
    cfg: RunConfig
    layout: Layout | None
    excluded_because: str | None = None

    @property
    def name(self) -> str:
        c, lay = self.cfg, self.layout
        parts = [c.strategy]
        if lay is None:
            return " ".join([c.strategy, f"dp {c.dp}", f"tp {c.tp}", c.schedule if c.strategy == "pp" else ""]).strip()
        parts += [f"{k}{v}" for k, v in (("dp", lay.dp), ("pp", lay.pp), ("tp", lay.tp)) if v > 1]
        if c.strategy == "mp":
            parts.append(f"{lay.stages} stages")
        if c.strategy == "pp":
            parts += [c.schedule, f"m{c.microbatches}"]
        if lay.dp > 1:
            parts.append(lay.dp_mode)
        if c.sequence_parallel:
            parts.append("sp")
        return " ".join(parts)

    def flags(self) -> list[str]:
        """The submit flags that run this layout (the model's and the user's other flags aside)."""
        c = self.cfg
        out = ["--strategy", c.strategy, "--gpus", str(c.gpus)]
        if c.nodes != 1:
            out += ["--nodes", str(c.nodes)]
        if c.dp is not None and c.strategy != "dp":
            out += ["--dp", str(c.dp)]
        if c.dp_mode is not None:
            out += ["--dp-mode", c.dp_mode]
        if c.tp > 1 and c.strategy == "pp":
            out += ["--tp", str(c.tp)]
        if c.strategy == "pp":
            out += ["--schedule", c.schedule, "--microbatches", str(c.microbatches)]
        if c.split is not None:
            out += ["--split", ",".join(map(str, c.split))]
        if c.sequence_parallel:
            out.append("--sequence-parallel")
        return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _raw(base: RunConfig, given: set[str]) -> list[RunConfig]:
    """Every combination of the axes for base.gpus, before any check."""
    gpus, out = base.gpus, []
    pick = lambda name, values: [getattr(base, name)] if name in given else values  # noqa: E731
    strategies = pick("strategy", ["reference", "dp", "mp", "pp", "tp"])
    for s in strategies:
        if s == "reference":
            out.append(dict(strategy=s, dp=None, tp=1))
        elif s == "dp":
            out += [dict(strategy=s, dp=gpus, tp=1, dp_mode=mode) for mode in pick("dp_mode", ["ddp", "fsdp"])]
        for dp in pick("dp", _divisors(gpus)) if s in ("mp", "pp", "tp") else []:
            per = gpus // dp if gpus % dp == 0 else 0
            modes = pick("dp_mode", ["ddp", "fsdp"]) if dp > 1 else [None]
            if s == "mp" and per >= 2:  # one stage per replica is dp
                out += [dict(strategy=s, dp=dp, tp=1, dp_mode=mode) for mode in modes]
            if s == "tp" and per >= 2:
                for sp in pick("sequence_parallel", [False, True]):
                    out += [dict(strategy=s, dp=dp, tp=per, dp_mode=mode, sequence_parallel=sp) for mode in modes]
            if s != "pp":
                continue
            for tp in pick("tp", [t for t in _divisors(per) if per // t >= 2]):
                pp = per // tp if per % tp == 0 else 0
                for schedule in pick("schedule", list(SCHEDULES)):
                    for m in pick("microbatches", _microbatch_counts(base, schedule, dp, pp)):
                        for mode in modes:
                            for sp in pick("sequence_parallel", [False, True] if tp > 1 else [False]):
                                out.append(
                                    dict(
                                        strategy=s,
                                        dp=dp,
                                        tp=tp,
                                        schedule=schedule,
                                        microbatches=m,
                                        dp_mode=mode,
                                        sequence_parallel=sp,
                                    )
                                )
    return [dataclasses.replace(base, **{"dp_mode": None, "sequence_parallel": False, **c}) for c in out]


def _microbatch_counts(base: RunConfig, schedule: str, dp: int, pp: int) -> list[int]:
    """p, 2p and 4p micro-batches (the fewest most schedules run with, then smaller bubbles), where
    the replica's batch divides into them."""
    local = base.resolved_batch_size // dp
    lo = pp if SCHEDULES[schedule].min_microbatches == "p" else 1
    counts = sorted({m for m in (pp, 2 * pp, 4 * pp) if m >= lo})
    fitting = [m for m in counts if local % m == 0]
    return fitting or counts[:1]  # none divides: keep one, so the exclusion says why


def enumerate_layouts(base: RunConfig, given: set[str]) -> list[Candidate]:
    """Every candidate layout, each with its Layout or the reason it cannot run."""
    out = []
    for cfg in _raw(base, given - {"split"}):
        cfg = dataclasses.replace(cfg, split=None, balance=None)  # the planner chooses the cut
        try:
            out.append(Candidate(cfg, validate_run(cfg)))
        except ConfigError as e:
            out.append(Candidate(cfg, None, str(e)))
    return out


def reason_key(why: str) -> str:
    """An exclusion's reason without its numbers, so alike ones are counted together."""
    head = re.split(r": (?:use|pick|choose|drop|raise|change|give)", why)[0]
    return re.sub(r"(?<![A-Za-z])\d+(\.\d+)?", "N", head)
