"""Multi-process harness: run a callable on N gloo ranks on a free port; report the failing rank.

Each rank is a fresh spawned process (as torchrun would start it) with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. A rank that raises fails the call with that rank's
traceback; a rank that hangs fails it after ``timeout_s`` (all ranks are then killed).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback

from core.parallel.distributed import free_port


def _child(fn, rank: int, world: int, port: int, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on 2 cores: no thread oversubscription
    try:
        results.put((rank, True, fn()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


class RankFailed(AssertionError):
    pass


def run_ranks(fn, world: int, timeout_s: float = 240.0) -> list:
    """fn() on every rank; returns the per-rank return values (must be picklable)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(out))
                raise RankFailed(f"ranks {missing} gave no result within {timeout_s:.0f} s") from None
            if not ok:
                raise RankFailed(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
