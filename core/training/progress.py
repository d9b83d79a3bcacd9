"""What each rank is doing now, and a report of it when the run stops making progress.

The field's most reported pipeline failure is a silent hang: one rank stops, the others wait in a
receive or a collective until the timeout, and the user learns only that something timed out.
Here every rank keeps its current action (step, stage, micro-batch, forward / backward / weight,
the receives it has posted and from whom) in memory, at the cost of a few attribute writes. A
watchdog thread writes ``<run>/hang/rank-R.json`` (the action, what it waits for, when it last
made progress, and its Python stack) when no progress was noted for ``--hang-timeout`` seconds,
and the training loop writes it too when a collective times out. The submit command reads these
files and prints one table (jobs.launch.hang_report). A rank that cannot write (stopped, killed) is
conspicuous by its missing or oldest report.

On NCCL, torch's flight recorder keeps the last collectives; its dump on timeout is pointed into
the same folder (``enable_flight_recorder``), so a hang on GPUs also leaves torch's own trace.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback

_current: Progress | None = None


def watchdog_period_s(hang_timeout_s: float) -> float:
    """How often a rank's watchdog looks at its progress: a report comes at most this late."""
    return max(0.5, min(5.0, hang_timeout_s / 4))


def current() -> Progress | None:
    """This process's progress record (None outside a training run): what hooks note into."""
    return _current


class Progress:
    def __init__(self, rank: int, run_dir: str | None, hang_timeout_s: float) -> None:
        self.rank, self.run_dir, self.hang_timeout_s = rank, run_dir, hang_timeout_s
        self.node = socket.gethostname()
        self.step = 0
        self.stage: int | None = None
        self.microbatch: int | None = None
        self.action = "starting"
        self.last = time.time()
        # posted receives not yet consumed: key -> ("rank 0 (stage 0): activation of ...", rank 0)
        self.waiting: dict[tuple, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._reported_at: float | None = None
        self.armed = False  # from the first note on: setup (data, profiling) may take long

    def note(self, action: str, stage: int | None = -1, microbatch: int | None = None) -> None:
        """Progress: ``action`` begins now. ``stage`` -1 keeps the stage noted last (a step-level
        note on a pipeline rank is still that stage's)."""
        self.action, self.microbatch = action, microbatch
        if stage != -1:
            self.stage = stage
        self.last = time.time()
        self.armed = True

    def expect(self, key: tuple, what: str, peer: int) -> None:
        """A receive was posted: until ``consumed(key)``, this rank may be waiting for it."""
        self.waiting[key] = (what, peer)

    def consumed(self, key: tuple) -> None:
        self.waiting.pop(key, None)

    def waiting_for(self) -> tuple[str, int] | tuple[None, None]:
        return next(iter(self.waiting.values()), (None, None))

    # ---- the report ------------------------------------------------------------------------
    def report(self, reason: str) -> dict:
        main = sys._current_frames().get(threading.main_thread().ident)
        return {
            "rank": self.rank,
            "node": self.node,
            "pid": os.getpid(),
            "step": self.step,
            "stage": self.stage,
            "microbatch": self.microbatch,
            "action": self.action,
            "waiting_for": self.waiting_for()[0],
            "waits_on": self.waiting_for()[1],
            "last_progress_at": self.last,
            "reported_at": time.time(),
            "reason": reason,
            "hang_timeout_s": self.hang_timeout_s,
            "stack": "".join(traceback.format_stack(main)) if main is not None else "",
        }

    def write_report(self, reason: str) -> str | None:
        if not self.run_dir:
            return None
        folder = os.path.join(self.run_dir, "hang")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank-{self.rank}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.report(reason), f, indent=2)
        os.replace(tmp, path)
        return path

    # ---- the watchdog ----------------------------------------------------------------------
    def start_watchdog(self) -> None:
        threading.Thread(target=self._watch, name="mps-hang-watchdog", daemon=True).start()

    def _watch(self) -> None:
        every = watchdog_period_s(self.hang_timeout_s)
        while not self._stop.wait(every):
            idle = time.time() - self.last
            if self.armed and idle >= self.hang_timeout_s and self._reported_at != self.last:
                self._reported_at = self.last  # one report per stall
                self.write_report(f"no progress for {idle:.0f} s (--hang-timeout {self.hang_timeout_s:g})")

    def stop(self) -> None:
        self._stop.set()


def start(rank: int, run_dir: str | None, hang_timeout_s: float) -> Progress:
    global _current
    _current = Progress(rank, run_dir, hang_timeout_s)
    _current.start_watchdog()
    return _current


def finish() -> None:
    global _current
    if _current is not None:
        _current.stop()
    _current = None


def enable_flight_recorder(run_dir: str | None) -> None:
    """torch's NCCL flight recorder: keep the last collectives and dump them on a timeout into
    ``<run>/hang/`` (read before the process group is created; harmless on gloo)."""
    if not run_dir:
        return
    # TORCH_FR_BUFFER_SIZE: the name torch 2.11 and 2.14 read (the older TORCH_NCCL_TRACE_BUFFER_SIZE
    # makes every rank print a deprecation warning)
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.makedirs(os.path.join(run_dir, "hang"), exist_ok=True)
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(run_dir, "hang", "nccl-flight-recorder-rank-"))


def watch_stage(stage, group=None) -> None:
    """Note a PipelineStage's actions as the schedule calls them (wrapped on the instance, like
    pp.stage_timing): receives posted, forward / backward / weight of each micro-batch, sends.
    ``group`` is the pipeline's process group (None: the world)."""
    import torch.distributed as dist

    idx = stage.stage_index

    def rank_of(i: int) -> int:
        # read when needed: a V-shaped schedule places stages after the stage is built
        local = stage.stage_index_to_group_rank[i]
        return dist.get_global_rank(group, local) if group is not None else local

    def peer(i: int) -> str:
        return f"rank {rank_of(i)} (stage {i})"

    def wrap(name: str, before):
        fn = getattr(stage, name)

        def wrapper(chunk_id, *args, **kwargs):
            p = current()
            if p is not None:
                before(p, chunk_id)
            return fn(chunk_id, *args, **kwargs)

        setattr(stage, name, wrapper)

    def fwd_recv(p, mb):
        if not stage.is_first:
            p.expect(("F", idx, mb), f"{peer(idx - 1)}: activation of micro-batch {mb}", rank_of(idx - 1))
        p.note("posted receive of an activation", idx, mb)

    def bwd_recv(p, mb):
        if not stage.is_last:
            p.expect(("B", idx, mb), f"{peer(idx + 1)}: gradient of micro-batch {mb}", rank_of(idx + 1))
        p.note("posted receive of a gradient", idx, mb)

    def forward(p, mb):
        p.consumed(("F", idx, mb))
        p.note("forward", idx, mb)

    def backward(p, mb):
        p.consumed(("B", idx, mb))
        p.note("backward", idx, mb)

    wrap("get_fwd_recv_ops", fwd_recv)
    wrap("get_bwd_recv_ops", bwd_recv)
    wrap("forward_one_chunk", forward)
    wrap("backward_one_chunk", backward)
    wrap("backward_weight_one_chunk", lambda p, mb: p.note("weight gradient", idx, mb))
    if not stage.is_last:
        wrap("get_fwd_send_ops", lambda p, mb: p.note(f"send activation to {peer(idx + 1)}", idx, mb))
    if not stage.is_first:
        wrap("get_bwd_send_ops", lambda p, mb: p.note(f"send gradient to {peer(idx - 1)}", idx, mb))
