"""``--validate``: check nodes before users get them. One job over ``--nodes K`` with ``--gpus N``
(N / K GPUs, or gloo processes on CPU, per node) measures:

- per node: devices visible and usable (a matmul checked against the CPU), a matmul rate,
  an all-reduce bus bandwidth inside the node (nccl-tests' definition: 2(n-1)/n x bytes / time);
- per node pair: point-to-point bandwidth (the slower direction) and the median round trip / 2 (latency;
  the best of 5 windows of 21 round trips),
  between the first rank of each node, one pair at a time so pairs do not share the wire.

It prints one table with pass/fail against thresholds (defaults per device kind below, each
overridable with ``--threshold KEY=VALUE``), writes ``validate.json`` and ``validate.png``
(heatmaps of bandwidth and latency) into the run folder, and exits 1 naming the bad node or link.

    python jobs/submit.py --validate --nodes 2 --gpus 16             # 8 GPUs per node
    python jobs/submit.py --validate --nodes 3 --gpus 3 --device cpu --threshold p2p_gbps=0.5
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time

from core.parallel import distributed
from core.parallel.distributed import all_objects
from jobs.cli import side_job
from jobs.cli.common import fail

DEFAULTS: dict[str, dict[str, float]] = {
    # CPU/gloo: a floor that even a loaded, shared 2-core test host meets (matmul measured 1.5-23
    # GFLOP/s there, one thread per rank); a broken or throttled link is
    # orders of magnitude below it (netem at 20 Mbit/s: 0.0025 GB/s).
    "cpu": {"matmul_gflops": 0.1, "allreduce_gbps": 0.05, "p2p_gbps": 0.05, "p2p_latency_ms": 5.0},
    # Hopper (H100/H200): bf16 dense peak is ~990 TFLOP/s, a healthy GPU sustains well over half on
    # 8192^2; NVLink all-reduce busbw of 8 GPUs is ~350-450 GB/s; one 400 Gb/s NDR port per GPU
    # gives ~45 GB/s, so a node pair well below 10 GB/s has a bad HCA, cable or route.
    "hopper": {"matmul_gflops": 400_000, "allreduce_gbps": 100, "p2p_gbps": 10, "p2p_latency_ms": 0.1},
    # any other CUDA GPU: loose floors that catch a broken device or a link falling back to TCP
    "cuda": {"matmul_gflops": 20_000, "allreduce_gbps": 10, "p2p_gbps": 1, "p2p_latency_ms": 0.5},
}
OUTLIER = 4.0
"""With 3 or more links, a link is also bad when its bandwidth is OUTLIER times below the median
link's (or its latency OUTLIER times above and over 1 ms): a throttled link among healthy ones
shows up even where the absolute floors are loose."""

LATENCY_WINDOWS, LATENCY_GAP_S = 5, 0.02
"""A link's latency: the best median of 5 windows of 21 round trips, 20 ms apart."""


def device_kind(name: str) -> str:
    n = name.upper()
    if "H100" in n or "H200" in n or "GH200" in n:
        return "hopper"
    return "cpu" if n == "CPU" else "cuda"


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """KEY=VALUE overrides; ValueError with one line for a bad one."""
    out = {}
    keys = DEFAULTS["cpu"]
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--threshold takes KEY=VALUE with KEY one of {', '.join(keys)} (got {item!r})")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--threshold {key} needs a number (got {value!r})") from None
        # a nan compares false with everything and a negative floor is always met: either would
        # switch the check off without saying so
        if not math.isfinite(out[key]) or out[key] < 0:
            raise ValueError(f"--threshold {key} must be a finite number, 0 or more (got {value!r})")
    return out


# ---- inside the job ------------------------------------------------------------------------------
def _timed(fn, seconds: float, sync) -> tuple[int, float]:
    """Run fn repeatedly for about ``seconds``; (iterations, elapsed). Local work only: ranks
    would run different counts."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        if time.perf_counter() - t0 >= seconds:
            return n, time.perf_counter() - t0


class ValidateTask:
    """Every task of the validation job runs this; rank 0 returns the measurements."""

    def __init__(self, plan) -> None:
        self.plan = plan

    def __call__(self) -> dict | None:
        import socket

        import submitit
        import torch
        import torch.distributed as dist

        if self.plan.layout.distributed:
            env = submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
            distributed.pin_network(verbose=env.rank == 0)
        torch.set_num_threads(1)  # CPU runs: ranks share the host's cores, one thread each is fair
        state = distributed.init_distributed(self.plan.layout, self.plan.device, self.plan.cfg.dist_timeout_s)
        dev = state.device
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
        try:
            return self._measure(state, dev, node, dist, torch)
        finally:
            distributed.shutdown()

    def _measure(self, state, dev, node, dist, torch) -> dict | None:
        cuda = dev.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        name = torch.cuda.get_device_name(dev) if cuda else "CPU"
        # usable: a matmul on the device agrees with the CPU's (a broken GPU or driver does not)
        a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        usable = bool(torch.allclose((a.to(dev) @ a.to(dev)).cpu(), a @ a, rtol=1e-3, atol=1e-3))
        n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
        x = torch.randn(n, n, device=dev, dtype=dtype)
        its, dt = _timed(lambda: x @ x, 0.5 if cuda else 0.3, sync)
        me = {
            "rank": state.rank,
            "node": node,
            "device": name,
            "visible": torch.cuda.device_count() if cuda else 1,
            "usable": usable,
            "matmul_gflops": 2 * n**3 * its / dt / 1e9,
        }
        everyone = all_objects(me)
        nodes = list(dict.fromkeys(e["node"] for e in everyone))
        ranks_of = {nd: [e["rank"] for e in everyone if e["node"] == nd] for nd in nodes}
        allreduce = self._allreduce(state, dist, torch, dev, sync, nodes, ranks_of)
        links = self._p2p(state, dist, torch, dev, sync, nodes, ranks_of)
        gathered = all_objects((allreduce, links))
        if not state.is_main:
            return None
        report = {"nodes": {}, "links": {}, "device_kind": device_kind(everyone[0]["device"])}
        for nd in nodes:
            mine = [e for e in everyone if e["node"] == nd]
            report["nodes"][nd] = {
                "ranks": ranks_of[nd],
                "device": mine[0]["device"],
                "visible": min(e["visible"] for e in mine),
                "usable": all(e["usable"] for e in mine),
                "matmul_gflops": min(e["matmul_gflops"] for e in mine),  # the slowest device decides
                "allreduce_gbps": gathered[ranks_of[nd][0]][0],
            }
        for _, lk in gathered:
            report["links"].update(lk)
        return report

    def _allreduce(self, state, dist, torch, dev, sync, nodes, ranks_of) -> float | None:
        """Bus bandwidth of an all-reduce among this node's ranks (None with one rank per node).
        Every node measures at once: the traffic stays inside each node."""
        groups = {nd: dist.new_group(ranks_of[nd]) for nd in nodes} if state.world_size > 1 else {}
        mine = next(nd for nd in nodes if state.rank in ranks_of[nd])
        k = len(ranks_of[mine])
        if k == 1:
            return None
        numel = (64 << 20) // 4 if dev.type == "cuda" else (4 << 20) // 4
        t = torch.ones(numel, device=dev)
        # a fixed count, never "until 0.3 s": each rank would stop after its own count and the
        # group's collectives would no longer match (a hang until the timeout)
        its = 20 if dev.type == "cuda" else 5
        dist.all_reduce(t, group=groups[mine])  # warm-up: connections, buffers
        sync()
        t0 = time.perf_counter()
        for _ in range(its):
            dist.all_reduce(t, group=groups[mine])
        sync()
        return numel * 4 * 2 * (k - 1) / k * its / (time.perf_counter() - t0) / 1e9

    def _p2p(self, state, dist, torch, dev, sync, nodes, ranks_of) -> dict:
        """Node pair -> {gbps, latency_ms}; measured by the pair's first ranks, one pair at a time."""
        out = {}
        cuda = dev.type == "cuda"
        small = torch.zeros(1, device=dev)
        big = torch.zeros((256 << 20) // 4 if cuda else (8 << 20) // 4, device=dev)
        for i, a in enumerate(nodes):
            for b in nodes[i + 1 :]:
                ra, rb = ranks_of[a][0], ranks_of[b][0]
                if state.rank in (ra, rb):
                    peer = rb if state.rank == ra else ra

                    def ping(t, first: bool, peer=peer) -> None:
                        if first:
                            dist.send(t, peer)
                            dist.recv(t, peer)
                        else:
                            dist.recv(t, peer)
                            dist.send(t, peer)

                    first = state.rank == ra
                    ping(small, first)  # connect before timing
                    sync()
                    windows = []
                    for w in range(LATENCY_WINDOWS):
                        if w:
                            time.sleep(LATENCY_GAP_S)  # both ends sleep alike: the next window starts together
                        trips = []
                        for _ in range(21):
                            t0 = time.perf_counter()
                            ping(small, first)
                            sync()
                            trips.append(time.perf_counter() - t0)
                        windows.append(statistics.median(trips))
                    # the median round trip: one ping that waited for a busy host's scheduler would
                    # move a mean (1.2 ms read as 5x the median link on a loaded 2-core test host);
                    # the best of windows spread in time: a burst of load can outlast the 21 pings of
                    # one window (1.26 ms, 15x the median link, with three test suites on 2 cores),
                    # while a slow link is slow in every window
                    latency_ms = min(windows) / 2 * 1e3
                    rates = []
                    for sender in (True, False):  # each direction; the slower one is the link's
                        t0 = time.perf_counter()
                        for _ in range(3):
                            (dist.send if first == sender else dist.recv)(big, peer)
                        dist.send(small, peer) if first != sender else dist.recv(small, peer)  # receiver done
                        sync()
                        rates.append(3 * big.numel() * 4 / (time.perf_counter() - t0) / 1e9)
                    if first:
                        out[f"{a}-{b}"] = {"gbps": min(rates), "latency_ms": latency_ms}
                dist.barrier()
        return out


# ---- on the submitting host ----------------------------------------------------------------------
def judge(report: dict, thresholds: dict[str, float]) -> list[str]:
    """The failures, one phrase each, naming the node or link; fills report's ``pass`` fields."""
    th = thresholds
    bad = []
    for nd, r in report["nodes"].items():
        why = []
        if not r["usable"] or r["visible"] < 1:
            why.append(f"devices not usable ({r['visible']} visible)")
        if r["matmul_gflops"] < th["matmul_gflops"]:
            why.append(f"matmul {r['matmul_gflops']:.1f} GFLOP/s < {th['matmul_gflops']:g}")
        if r["allreduce_gbps"] is not None and r["allreduce_gbps"] < th["allreduce_gbps"]:
            why.append(f"all-reduce {r['allreduce_gbps']:.3f} GB/s < {th['allreduce_gbps']:g}")
        r["pass"] = not why
        bad += [f"node {nd}: " + ", ".join(why)] if why else []
    links = report["links"]
    med_bw = statistics.median(v["gbps"] for v in links.values()) if len(links) >= 3 else None
    med_lat = statistics.median(v["latency_ms"] for v in links.values()) if len(links) >= 3 else None
    for name, v in links.items():
        why = []
        if v["gbps"] < th["p2p_gbps"]:
            why.append(f"bandwidth {v['gbps']:.4f} GB/s < {th['p2p_gbps']:g}")
        elif med_bw and v["gbps"] * OUTLIER < med_bw:
            why.append(f"bandwidth {v['gbps']:.4f} GB/s, {med_bw / v['gbps']:.0f}x below the median link")
        if v["latency_ms"] > th["p2p_latency_ms"]:
            why.append(f"latency {v['latency_ms']:.3f} ms > {th['p2p_latency_ms']:g}")
        elif med_lat and v["latency_ms"] > OUTLIER * med_lat and v["latency_ms"] > 1.0:
            why.append(f"latency {v['latency_ms']:.3f} ms, {v['latency_ms'] / med_lat:.0f}x the median link")
        v["pass"] = not why
        bad += [f"link {name}: " + ", ".join(why)] if why else []
    return bad


def table(report: dict) -> str:
    def ok(p: bool) -> str:
        return "pass" if p else "FAIL"

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    rows = [f"{'node':<10} {'devices':<22} {'matmul GFLOP/s':>15} {'all-reduce GB/s':>16}  result"]
    for nd, r in report["nodes"].items():
        dev = f"{len(r['ranks'])}x {r['device']}"[:22] + ("" if r["usable"] else " BROKEN")  # one per rank
        rows.append(
            f"{nd:<10} {dev:<22} {r['matmul_gflops']:>15.1f} {num(r['allreduce_gbps'], '.3f'):>16}  {ok(r['pass'])}"
        )
    rows.append(f"{'link':<10} {'':<22} {'p2p GB/s':>15} {'latency ms':>16}  result")
    for name, v in report["links"].items():
        rows.append(f"{name:<10} {'':<22} {v['gbps']:>15.4f} {v['latency_ms']:>16.3f}  {ok(v['pass'])}")
    return "\n".join(rows)


def heatmap(report: dict, path: str) -> None:
    """Two node x node maps: p2p bandwidth (diagonal: the node's all-reduce bus bandwidth) and
    latency; failing cells outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nodes = list(report["nodes"])
    k = len(nodes)
    bw, lat = np.full((k, k), np.nan), np.full((k, k), np.nan)
    bad = np.zeros((k, k), bool)
    for i, nd in enumerate(nodes):
        ar = report["nodes"][nd]["allreduce_gbps"]
        bw[i, i] = ar if ar is not None else np.nan
        bad[i, i] = not report["nodes"][nd]["pass"]
    for name, v in report["links"].items():
        a, b = name.split("-", 1)
        i, j = nodes.index(a), nodes.index(b)
        bw[i, j] = bw[j, i] = v["gbps"]
        lat[i, j] = lat[j, i] = v["latency_ms"]
        bad[i, j] = bad[j, i] = not v["pass"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * k, 2 + 1.4 * k))
    for ax, m, title, cmap in ((axes[0], bw, "bandwidth GB/s (diagonal: all-reduce)", "viridis"),
                               (axes[1], lat, "p2p latency ms", "magma_r")):  # fmt: skip
        im = ax.imshow(m, cmap=cmap)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(k), nodes)
        ax.set_yticks(range(k), nodes)
        ax.set_title(title, fontsize=9)
        for i in range(k):
            for j in range(k):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8,
                            bbox={"fc": "white", "alpha": 0.7, "lw": 0})  # fmt: skip
                if bad[i, j] and not np.isnan(m[i, j]):
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=3))
    fig.suptitle(f"node validation: {k} node(s), {report['nodes'][nodes[0]]['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_validate(cfg, threshold_items: list[str], dry_run: bool = False) -> int:
    """Submit the validation job, wait, judge, write validate.json and validate.png. Exit code."""
    try:
        overrides = parse_thresholds(threshold_items)
    except ValueError as e:
        return fail(str(e))
    if cfg.gpus < 1:  # said before the batch size is derived from it, which would name --batch-size
        return fail(f"--gpus must be at least 1 (got {cfg.gpus}): --validate runs one process per device")
    # one process per device, no model: the dp layout has exactly that shape (N / K per node)
    cfg = dataclasses.replace(
        cfg,
        strategy="dp",
        dp=None,
        tp=1,
        model="delay",
        flavor="tiny",
        dataset=None,
        split=None,
        check=False,
        batch_size=cfg.gpus,  # never trained on: only has to split into --gpus shards
    )
    t0 = time.time()
    try:
        job, plan = side_job.submit(cfg, dry_run, ValidateTask)
        lay = plan.layout
        print(
            f"submitted node validation as job {job.job_id} to {plan.cluster}: {lay.nodes} node(s) x "
            f"{lay.processes_per_node} process(es); run folder {plan.run_dir}",
            flush=True,
        )
        # wait_for names a lost node (jobs.launch.nodes) and the first failing rank; no retries: a
        # validation that lost a node has its answer
        report = side_job.wait(job, plan, dataclasses.replace(cfg, max_retries=0), "validation")
    except side_job.Ended as e:
        return e.code
    thresholds = {**DEFAULTS[report["device_kind"]], **overrides}
    bad = judge(report, thresholds)
    report.update(thresholds=thresholds, failures=bad, passed=not bad, seconds=round(time.time() - t0, 1))
    with open(os.path.join(plan.run_dir, "validate.json"), "w") as f:
        json.dump(report, f, indent=1)
    heatmap(report, os.path.join(plan.run_dir, "validate.png"))
    print(table(report), flush=True)
    print(f"thresholds ({report['device_kind']}): " + ", ".join(f"{k}={v:g}" for k, v in thresholds.items()))
    print(f"validate.json and validate.png in {plan.run_dir}", flush=True)
    if bad:
        print(f"error: validation failed: {'; '.join(bad)}", file=sys.stderr, flush=True)
        return 1
    return 0
