"""Pipeline schedules by name: torch's own classes, the stage placement each needs, its theory.

We choose nothing about ordering: the schedule classes are torch.distributed.pipelining's, looked
up with its ``get_schedule_class``. What is ours: which stages a rank holds (derived from the
schedule, never asked of the user) and the textbook bubble to compare measurements with.
"""

from __future__ import annotations

from core.parallel.pipeline_schedules import SCHEDULES, ScheduleInfo

__all__ = ["SCHEDULES", "ScheduleInfo", "min_microbatches", "stage_indices", "stage_owner", "theory_bubble"]


def stage_indices(schedule: str, pp_rank: int, pp_size: int) -> list[int]:
    """The global stage indices this pipeline rank holds, in the order torch expects."""
    info = SCHEDULES[schedule]
    if info.stages_per_rank == 1:
        return [pp_rank]
    if info.placement == "v":  # ZBV / DualPipeV: the first and last stage meet on rank 0
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(info.stages_per_rank)]


def stage_owner(schedule: str, stage: int, pp_size: int) -> int:
    for r in range(pp_size):
        if stage in stage_indices(schedule, r, pp_size):
            return r
    raise ValueError(f"no rank holds stage {stage}")


def min_microbatches(schedule: str, pp_size: int) -> int:
    return pp_size if SCHEDULES[schedule].min_microbatches == "p" else 1


def theory_bubble(schedule: str, p: int, m: int) -> float | None:
    """Idle share of a step in the textbook cost model (equal stages, communication free).

    GPipe and 1F1B idle (p-1) stage-slots of (m+p-1): (p-1)/(m+p-1) (Huang et al. 2019). With v
    chunks per rank each slot shrinks v-fold: (p-1)/(v*m+p-1) (Narayanan et al. 2021), also for
    breadth-first looping. Zero-bubble schedules fill the bubble with weight-gradient work whose
    size depends on the model (our delay model has none), so there is no model-free figure: None.
    """
    info = SCHEDULES[schedule]
    if "zero-bubble" in schedule or schedule == "dualpipev":
        return None
    v = info.stages_per_rank
    return (p - 1) / (v * m + p - 1)
