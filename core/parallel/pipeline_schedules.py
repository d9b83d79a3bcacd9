"""The pipeline schedules by name, as data: torch's class name and how many stages each rank holds.

Kept in core because the layout (core.parallel.layout) derives the stage count from it; everything that
acts on a schedule (placement order, theory, building) lives in pp/.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleInfo:
    torch_name: str
    """Name for torch.distributed.pipelining.schedules.get_schedule_class."""
    stages_per_rank: int
    """1: one stage per rank; 2: two chunks per rank (interleaved loop or V shape)."""
    placement: str
    """'loop': rank r holds stages r, r+p, ...; 'v': rank r holds r and 2p-1-r."""
    min_microbatches: str
    """'1' or 'p': the fewest micro-batches the schedule runs with (p = pipeline ranks)."""


SCHEDULES = {
    "gpipe": ScheduleInfo("GPipe", 1, "loop", "1"),
    "1f1b": ScheduleInfo("1F1B", 1, "loop", "p"),
    "interleaved-1f1b": ScheduleInfo("Interleaved1F1B", 2, "loop", "p"),
    "looped-bfs": ScheduleInfo("LoopedBFS", 2, "loop", "1"),
    "interleaved-zero-bubble": ScheduleInfo("InterleavedZeroBubble", 2, "loop", "p"),
    "zbv-zero-bubble": ScheduleInfo("ZBVZeroBubble", 2, "v", "p"),
    "dualpipev": ScheduleInfo("DualPipeV", 2, "v", "p"),
}
