"""Timings, throughput, peak memory, and the one result format (result.json, DESIGN.md section 3)."""

from __future__ import annotations

import json
import os
import resource
import time

import torch


def sync(devices: list[torch.device]) -> None:
    """Wait for queued GPU work, so a wall-clock reading means what it says. No-op on CPU."""
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def reset_peak_memory(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def peak_memory_bytes(devices: list[torch.device]) -> tuple[list[int], str]:
    """Peak memory of each device this rank used, and what kind of figure it is.

    CUDA: the caching allocator's max_memory_allocated per device. CPU: the process's peak
    resident set (Linux ru_maxrss), which cannot be split by device, so one figure per process.
    """
    if all(d.type == "cuda" for d in devices):
        return [int(torch.cuda.max_memory_allocated(d)) for d in devices], "cuda_max_memory_allocated"
    return [int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024], "process_peak_rss"


class Stopwatch:
    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices
        self.t0 = self.now()

    def now(self) -> float:
        sync(self.devices)
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.t0


def write_json_atomic(path: str, data: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_result(folder: str) -> dict:
    with open(os.path.join(folder, "result.json")) as f:
        return json.load(f)


def format_summary(result: dict, folder: str) -> str:
    """The short human summary printed at the end of a job."""
    lines = [
        f"== {result['strategy']} on {result['world_size']} process(es), {result['device']}: "
        f"{result['model']} / {result['dataset']}, {result['steps']} steps"
    ]
    lines.append(
        f"   final loss {result['final_loss']:.4f}   {result['samples_per_sec']:.1f} samples/s   "
        f"train time {result['train_time_s']:.1f} s"
    )
    if result.get("eval_accuracy") is not None:
        lines.append(
            f"   eval accuracy {100 * result['eval_accuracy']:.2f}% on {result['eval_samples']:,} held-out samples"
        )
    mem = ", ".join(f"{b / 2**20:.0f}" for b in result["peak_memory_bytes"])
    lines.append(f"   peak memory (MiB, {result['peak_memory_kind']}): {mem}")
    if result.get("bubble_fraction") is not None:
        what = f"{result['schedule']} with {result['microbatches']} micro-batches" if "schedule" in result else "idle"
        theory = result.get("bubble_fraction_theory")
        lines.append(
            f"   {what}: bubble {100 * result['bubble_fraction']:.1f}% measured"
            + (f", {100 * theory:.1f}% theory" if theory is not None else "")
        )
    if "check" in result:
        c = result["check"]
        verdict = "PASSED" if c["passed"] else "FAILED"
        lines.append(
            f"   check {verdict}: max |loss diff| {c['max_loss_abs_diff']:.3g}, max grad rel diff "
            f"{c['max_grad_rel_diff']:.3g} (tolerance {c['tolerance']:.0e}), max update rel diff "
            f"{c['max_param_rel_diff']:.3g} (tolerance {c['param_tolerance']:.0e})"
            + (f", max buffer rel diff {c['max_buffer_rel_diff']:.3g}" if c.get("buffers_compared") else "")
        )
        pairs = (("gradient", "worst_param"), ("update", "worst_param_after_step"), ("buffer", "worst_buffer"))
        worst = [f"{what} {c[key]}" for what, key in pairs if c.get(key)]
        if not c["passed"] and worst:  # where to look first
            lines.append("   worst parameters: " + ", ".join(worst))
    if result.get("attempts", 1) > 1:
        lines.append(f"   attempts: {result['attempts']} (requeued after a preemption or a failure)")
    lines.append(f"   results in {folder}")
    return "\n".join(lines)
