"""Measured timelines: when each stage ran each micro-batch's forward and backward.

torch's own schedule visualiser counts every action as one tick; we time the real thing. A style
reports actions to a ``TimelineRecorder`` (pp wraps its PipelineStages, mp hooks its stages);
every action is timed on one clock: the host's monotonic perf_counter, shared by all processes of
a host. On one CUDA device the start and end are CUDA events, placed on that clock by an event
recorded right after a synchronize at step start; across several devices in one process (mp)
each mark synchronises instead.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from core.parallel.distributed import all_objects
from core.report.render import save_timeline_png

# backward_one_chunk(full_backward=False) is the input-gradient half of a split backward
KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward-input", "W": "backward-weight"}


@dataclass
class Action:
    rank: int
    step: int
    stage: int
    kind: str
    microbatch: int
    start: float
    end: float


class TimelineRecorder:
    """Records the actions of steps 0..max_steps-1 (step 0 is warm-up: shapes, allocations).

    Only a few steps: on CUDA each recorded step ends with a synchronize, which the steady-state
    throughput (core.training.train, measured after step 4) must not see."""

    def __init__(self, rank: int, device: torch.device, max_steps: int = 4, sync_devices: list | None = None) -> None:
        self.rank, self.device, self.max_steps = rank, device, max_steps
        self.sync_devices = sync_devices  # several GPUs in one process: synchronise them at each mark
        self.actions: list[Action] = []
        self._pending: list[tuple] = []
        self._step = -1
        self._origin_host = 0.0
        self._origin_event = None

    @property
    def active(self) -> bool:
        return 0 <= self._step < self.max_steps

    def start(self):
        """A start mark, or None outside the recorded steps."""
        return self._mark() if self.active else None

    def record(self, stage: int, kind: str, microbatch: int, start, row: int | None = None) -> None:
        """Close an action opened with ``start()``; ``row`` overrides the rank (mp: one row per stage)."""
        if start is not None:
            self._pending.append((stage, kind, microbatch, start, self._mark(), row))

    def _mark(self):
        if self.sync_devices:
            for d in self.sync_devices:
                torch.cuda.synchronize(d)
            return time.perf_counter()
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin_step(self, step: int) -> None:
        self._step = step
        if not self.active:
            return
        if self.device.type == "cuda" and not self.sync_devices:
            torch.cuda.synchronize(self.device)
            self._origin_host = time.perf_counter()
            self._origin_event = self._mark()

    def end_step(self) -> None:
        if not self.active:
            return
        if self.device.type == "cuda" and not self.sync_devices:
            torch.cuda.synchronize(self.device)
            to_s = lambda ev: self._origin_host + self._origin_event.elapsed_time(ev) / 1000.0
        else:
            to_s = lambda t: t
        for stage, kind, mb, start, end, row in self._pending:
            rank = self.rank if row is None else row
            self.actions.append(Action(rank, self._step, stage, kind, mb, to_s(start), to_s(end)))
        self._pending.clear()


def gather_actions(actions: list[Action]) -> list[Action]:
    """Every rank's actions, on every rank."""
    return [Action(**a) for rank_actions in all_objects([asdict(a) for a in actions]) for a in rank_actions]


def measured_bubble(actions: list[Action]) -> tuple[float | None, float | None]:
    """(bubble fraction, step time) averaged over the recorded steps after warm-up.

    Per step: span = last end - first start over all ranks; each rank's busy time is the sum of
    its actions; bubble = 1 - mean busy / span. Communication waits count as idle: they are.
    """
    steps = sorted({a.step for a in actions})
    if len(steps) > 1:
        steps = steps[1:]  # step 0 includes shape inference and first allocations
    fractions, spans = [], []
    for s in steps:
        acts = [a for a in actions if a.step == s]
        span = max(a.end for a in acts) - min(a.start for a in acts)
        ranks = sorted({a.rank for a in acts})
        busy = [sum(a.end - a.start for a in acts if a.rank == r) for r in ranks]
        if span > 0:
            fractions.append(1.0 - sum(busy) / len(busy) / span)
            spans.append(span)
    if not fractions:
        return None, None
    return sum(fractions) / len(fractions), sum(spans) / len(spans)


def stage_busy(actions: list[Action]) -> list[float] | None:
    """Seconds each stage computed per step (its forwards and backwards), averaged over the
    recorded steps after warm-up, in stage order: what a balanced cut makes equal."""
    steps = sorted({a.step for a in actions})
    steps = steps[1:] if len(steps) > 1 else steps  # step 0: shape inference, first allocations
    if not steps:
        return None
    stages = sorted({a.stage for a in actions})
    return [sum(a.end - a.start for a in actions if a.stage == s and a.step in steps) / len(steps) for s in stages]


def chrome_trace(actions: list[Action], title: str) -> dict:
    """Chrome trace format (opens in Perfetto / chrome://tracing): one thread per rank."""
    t0 = min((a.start for a in actions), default=0.0)
    events = []
    for r in sorted({a.rank for a in actions}):
        stages = sorted({a.stage for a in actions if a.rank == r})
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": 0,
                "tid": r,
                "args": {"name": f"rank {r} (stage {', '.join(map(str, stages))})"},
            }
        )
    for a in actions:
        events.append(
            {
                "name": f"{a.kind}{a.microbatch}",
                "cat": KIND_NAMES[a.kind],
                "ph": "X",
                "pid": 0,
                "tid": a.rank,
                "ts": (a.start - t0) * 1e6,
                "dur": (a.end - a.start) * 1e6,
                "args": {"step": a.step, "stage": a.stage, "microbatch": a.microbatch, "kind": KIND_NAMES[a.kind]},
            }
        )
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"title": title}}


class RecordedTimeline:
    """One run's gathered timeline: the result.json figures and the timeline.json / .png files."""

    def __init__(self, recorder: TimelineRecorder, title: str, theory: float | None) -> None:
        self.recorder, self.title, self.theory = recorder, title, theory
        self._actions: list[Action] | None = None

    def actions(self) -> list[Action]:
        if self._actions is None:  # a collective: every rank calls it, once
            self._actions = gather_actions(self.recorder.actions)
        return self._actions

    def figures(self) -> dict:
        bubble, step_time = measured_bubble(self.actions())
        return {
            "bubble_fraction": bubble,
            "bubble_fraction_theory": self.theory,
            "timeline_step_time_s": step_time,
            "stage_busy_time_s": stage_busy(self.actions()),
        }

    def save(self, folder: str, write: bool) -> None:
        actions = self.actions()
        if not write or not actions:
            return
        import json
        import os

        with open(os.path.join(folder, "timeline.json"), "w") as f:
            json.dump(chrome_trace(actions, self.title), f)
        bubble, _ = measured_bubble(actions)
        sub = ""
        if bubble is not None:
            theory = f", {100 * self.theory:.0f}% theory" if self.theory is not None else ""
            sub = f" (bubble {100 * bubble:.0f}% measured{theory})"
        save_timeline_png([asdict(a) for a in actions], os.path.join(folder, "timeline.png"), self.title + sub)
