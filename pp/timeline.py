"""Measured pipeline timeline: when each stage ran each micro-batch's forward and backward.

torch's own schedule visualiser counts every action as one tick; we time the real thing. Each
stage's ``forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk`` is wrapped
on the instance (the schedule calls exactly these), and every call is timed on one clock: the
host's monotonic perf_counter, shared by all processes of a host. On CUDA the start and end are
CUDA events, placed on that clock by an event recorded right after a synchronize at step start.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

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
    """Records the actions of steps 0..max_steps-1 (step 0 is warm-up: shapes, allocations)."""

    def __init__(self, rank: int, device: torch.device, max_steps: int = 6) -> None:
        self.rank, self.device, self.max_steps = rank, device, max_steps
        self.actions: list[Action] = []
        self._pending: list[tuple] = []
        self._step = -1
        self._origin_host = 0.0
        self._origin_event = None

    @property
    def active(self) -> bool:
        return 0 <= self._step < self.max_steps

    def wrap(self, stage) -> None:
        def timed(kind_of, fn):
            def wrapper(chunk_id, *args, **kwargs):
                if not self.active:
                    return fn(chunk_id, *args, **kwargs)
                start = self._mark()
                out = fn(chunk_id, *args, **kwargs)
                self._pending.append((stage.stage_index, kind_of(kwargs, args), chunk_id, start, self._mark()))
                return out

            return wrapper

        def backward_kind(kwargs, args):
            full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
            return "B" if full else "I"

        stage.forward_one_chunk = timed(lambda kw, a: "F", stage.forward_one_chunk)
        stage.backward_one_chunk = timed(backward_kind, stage.backward_one_chunk)
        stage.backward_weight_one_chunk = timed(lambda kw, a: "W", stage.backward_weight_one_chunk)

    def _mark(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def begin_step(self, step: int) -> None:
        self._step = step
        if not self.active:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._origin_host = time.perf_counter()
            self._origin_event = self._mark()

    def end_step(self) -> None:
        if not self.active:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            to_s = lambda ev: self._origin_host + self._origin_event.elapsed_time(ev) / 1000.0
        else:
            to_s = lambda t: t
        for stage, kind, mb, start, end in self._pending:
            self.actions.append(Action(self.rank, self._step, stage, kind, mb, to_s(start), to_s(end)))
        self._pending.clear()


def gather_actions(actions: list[Action]) -> list[Action]:
    """Every rank's actions, on every rank (all_gather_object works on gloo and NCCL)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(actions)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, [asdict(a) for a in actions])
    return [Action(**a) for rank_actions in out for a in rank_actions]


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
