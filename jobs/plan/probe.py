"""Measure what a CPU job's ranks pay to talk: per pipeline message and per all-reduce, among as
many gloo processes as the job starts, on this host, under its load of the moment.

    python -c "from jobs.plan.probe import probe_link; print(probe_link(4, 65536))"

A pipeline message costs more than gloo's wire time: the receiving rank sleeps in a wait and must be
woken (on a busy host, after other processes' time slices), and torch's schedule does its own
bookkeeping around every action. So the probe runs torch's own runtime: one 1F1B pipeline over all
the processes, each stage a wait of known length (forward ``GAP_S``, backward twice that, as the
delay model waits), messages of the job's seam size. What the step takes beyond the waits, divided
by the messages on its critical path (2(m + p - 1)), is the cost of one message. The all-reduce is
timed the same way: every rank waits, then all-reduces a few bytes. Spawning the processes costs
a few seconds (each imports torch); the measurement itself well under a second per figure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import time

import torch

from core.parallel.distributed import free_port

GAP_S = 0.004  # a stage's forward wait; long enough that a rank really sleeps between messages
STEPS, WARMUP = 10, 2  # 1F1B steps timed after the warm-up (the first builds torch's stage metadata)
ALL_REDUCES = 20


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        time.sleep(GAP_S)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(2 * GAP_S)
        return grad.clone()


class _Stage(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(x * self.scale)


def _rank(rank: int, world: int, port: int, message_bytes: int, out) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        width = max(1, message_bytes // 4)
        m = 2 * world
        stage = PipelineStage(_Stage(width), rank, world, torch.device("cpu"))
        sched = Schedule1F1B(stage, n_microbatches=m, loss_fn=lambda out, y: out.sum(), scale_grads=False)
        x, y = torch.ones(m, width), torch.ones(m, width)
        times = []
        for _ in range(WARMUP + STEPS):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                sched.step(target=y)
            else:
                sched.step()
            times.append(time.perf_counter() - t0)
        # the median: one step slowed by another process on the host says nothing of the next
        step = torch.tensor([statistics.median(times[WARMUP:])])
        dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank does
        waits = m * 3 * GAP_S + (world - 1) * 3 * GAP_S  # m x (f + b) + the fill, every stage equal
        message_s = max(0.0, (float(step) - waits) / (2 * (m + world - 1)))
        small, spent = torch.zeros(8), []
        for _ in range(ALL_REDUCES):
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            dist.all_reduce(small)
            spent.append(time.perf_counter() - t0)
        reduce_t = torch.tensor([statistics.median(spent)])
        dist.all_reduce(reduce_t, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put((True, {"message_s": message_s, "all_reduce_s": float(reduce_t)}))
        dist.destroy_process_group()
    except BaseException as e:  # the parent reports it; a probe must never hang the plan
        out.put((False, f"rank {rank}: {type(e).__name__}: {e}"))


def probe_link(processes: int, message_bytes: int, timeout_s: float = 120.0) -> dict:
    """Per-message and per-all-reduce seconds among ``processes`` gloo ranks on this host.
    Raises RuntimeError (with the rank's reason) when the probe could not run."""
    if processes < 2:
        raise RuntimeError("a probe needs 2 processes or more")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_rank, args=(r, processes, port, message_bytes, out)) for r in range(processes)]
    for p in procs:
        p.start()
    try:
        ok, value = out.get(timeout=timeout_s)
    except queue.Empty:
        ok, value = False, f"no answer within {timeout_s:.0f} s"
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if not ok:
        raise RuntimeError(value)
    return {**value, "processes": processes, "message_bytes": message_bytes, "probe_s": time.perf_counter() - t0}
