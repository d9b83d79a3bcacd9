"""Timing a PipelineStage's actions: the schedule calls exactly these three methods per micro-batch.

They are wrapped on the instance, so the schedule, not us, decides the order; we only watch.
"""

from __future__ import annotations

from core.report.timeline import TimelineRecorder


def wrap_stage(recorder: TimelineRecorder, stage) -> None:
    def timed(kind_of, fn):
        def wrapper(chunk_id, *args, **kwargs):
            start = recorder.start()
            out = fn(chunk_id, *args, **kwargs)
            recorder.record(stage.stage_index, kind_of(args, kwargs), chunk_id, start)
            return out

        return wrapper

    def backward_kind(args, kwargs) -> str:
        # backward_one_chunk(chunk, loss=None, full_backward=True, ...): False is the input half
        full = kwargs.get("full_backward", args[1] if len(args) > 1 else True)
        return "B" if full else "I"

    stage.forward_one_chunk = timed(lambda a, k: "F", stage.forward_one_chunk)
    stage.backward_one_chunk = timed(backward_kind, stage.backward_one_chunk)
    stage.backward_weight_one_chunk = timed(lambda a, k: "W", stage.backward_weight_one_chunk)
