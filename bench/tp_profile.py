"""Where a tensor-parallel step's time goes: one GPU against tp 2 in one call, with a profile of each.

For each gpt size: the one-device reference (core.training.strategy.single_device_build), then tp 2 through
the suite's own build (tp.build_tp, core.training.train.make_optimizer) in each variant, steady tokens/s
over a few steps, and torch.profiler over one more step, summarised: GPU time in matmul kernels,
attention, NCCL collectives, the optimizer's kernels, element-wise and other kernels, and the
time the GPU sat idle (CPU gaps). Figures only, never pass/fail. Writes ``--out``.json and .txt.

Variants are '+'-joined tokens: ``plain`` | ``sp`` (sequence parallel) | ``lp`` (loss parallel) |
``compile`` (torch.compile per block, as --compile) | ``async`` (sp + compile with inductor's
micro-pipeline TP over symmetric memory). Undoing the tensor-parallel optimisations, to measure with and
without them in one call: ``mixed`` (the plan without its ReplicateParallel entries: norms and position embedding
plain tensors, AdamW tensor by tensor) | ``fp32comm`` (no cast before the collectives: backward ones,
and sequence parallel's forward all-gathers, in float32) | ``seqdim`` (sequence parallel shards
dim 1 of (B, T, d), the copying layout). ``plain+mixed+fp32comm`` is tensor parallel without them.

    python bench/tp_profile.py                                   # 2 GPUs, 356m and 2.7b
    python bench/tp_profile.py --flavors 356m:16 --variants plain,sp,sp+lp,plain+mixed
    python bench/tp_profile.py --device cpu --flavors tiny:4 --out /tmp/tp_profile_cpu   # gloo test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ATTENTION = ("flash", "fmha", "sdpa", "attention", "attn")
MATMUL = ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul", "splitk", "wgmma", "triton_tem")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "nccl"
    if any(k in n for k in ATTENTION):
        return "attention"
    if any(k in n for k in MATMUL):
        return "matmul"
    return "other"


def union_ms(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length (ms) of the union of [start, end) intervals in microseconds, and the merged list."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return sum(e - s for s, e in merged) / 1e3, [(s, e) for s, e in merged]


def overlap_ms(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length (ms) of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total / 1e3


def summarise_trace(path: str) -> dict:
    """One profiled step (kineto's Chrome trace): GPU time per kind of kernel, idle time, CPU time."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    launches, kernels, ann = {}, [], {}
    for e in events:
        cat, ph = e.get("cat", ""), e.get("ph")
        if ph != "X":
            continue
        if cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = e["ts"]
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(e)
        elif cat == "user_annotation" and e["name"].startswith("tp_profile:"):
            ann[e["name"].split(":", 1)[1]] = (e["ts"], e["ts"] + e["dur"])
    out: dict = {"cpu_ms": {k: round((e - s) / 1e3, 2) for k, (s, e) in ann.items()}}
    if not kernels:
        return out
    opt = ann.get("optimizer")
    per_kind: dict[str, float] = {}
    spans: dict[str, list[tuple[float, float]]] = {"nccl": [], "compute": []}
    names: dict[str, float] = {}
    for k in kernels:
        start, end = k["ts"], k["ts"] + k["dur"]
        launched = launches.get(k.get("args", {}).get("correlation"))
        if k["cat"] != "kernel":
            kind = "memcpy/memset"
        elif kernel_kind(k["name"]) == "nccl":
            # before the optimizer test: DTensor defers some reductions (sequence parallel's norm
            # weight gradients) until the optimizer first reads them; they are communication
            kind = "nccl"
        elif opt and launched is not None and opt[0] <= launched <= opt[1]:
            kind = "optimizer"
        else:
            kind = kernel_kind(k["name"])
        per_kind[kind] = per_kind.get(kind, 0.0) + k["dur"] / 1e3
        spans["nccl" if kind == "nccl" else "compute"].append((start, end))
        short = k["name"][:90]
        names[short] = names.get(short, 0.0) + k["dur"] / 1e3
    t0 = min(s for s, _ in ann.values()) if ann else min(k["ts"] for k in kernels)
    t1 = max(k["ts"] + k["dur"] for k in kernels)
    busy, _ = union_ms(spans["compute"] + spans["nccl"])
    compute, compute_m = union_ms(spans["compute"])
    nccl, nccl_m = union_ms(spans["nccl"])
    wall = (t1 - t0) / 1e3
    out.update(
        {
            "step_wall_ms": round(wall, 2),
            "gpu_kernel_ms": {k: round(v, 2) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
            "compute_busy_ms": round(compute, 2),
            "nccl_busy_ms": round(nccl, 2),
            "nccl_overlapped_with_compute_ms": round(overlap_ms(compute_m, nccl_m), 2),
            "gpu_idle_ms": round(wall - busy, 2),
            "kernels": len(kernels),
            "top_kernels_ms": {k: round(v, 2) for k, v in sorted(names.items(), key=lambda kv: -kv[1])[:10]},
        }
    )
    return out


def ideal_comm_ms(payload: dict, busbw: float | None, world: int) -> float | None:
    """Wire time of the counted collectives at the measured bus bandwidth (NCCL's busbw definitions)."""
    if not busbw:
        return None
    factor = {"all_reduce": 2 * (world - 1) / world, "reduce_scatter": (world - 1) / world, "all_gather": world - 1}
    return round(sum(b * factor.get(op, 1.0) for op, b in payload.items()) / busbw * 1e3, 2)


def bus_bandwidth(device: torch.device, world: int) -> dict:
    out = {}
    for mib in (64, 512):
        x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device=device)
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 10
        out[f"{mib}MiB"] = 2 * (world - 1) / world * mib * 2**20 / dt
        del x
    return out


class Runner:
    def __init__(self, a: argparse.Namespace, rank: int, world: int) -> None:
        from core.config import RunConfig
        from core.parallel import distributed
        from core.parallel.layout import Layout

        self.a, self.rank, self.world = a, rank, world
        self.cuda = a.device == "cuda"
        base = RunConfig(strategy="tp", gpus=world, model="gpt", dtype=a.dtype, device=a.device, log_every=10**9)
        self.state = distributed.init_distributed(Layout.from_config(base), a.device, timeout_s=900)
        self.device = self.state.device
        self.tmp = tempfile.mkdtemp(prefix=f"tp_profile_r{rank}_")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def cfg(self, flavor: str, batch: int, tokens: set[str], strategy: str):
        from core.config import RunConfig

        return RunConfig(
            strategy=strategy,
            gpus=1 if strategy == "reference" else self.world,
            model="gpt",
            flavor=flavor,
            batch_size=batch,
            steps=self.a.steps,
            dtype=self.a.dtype,
            device=self.a.device,
            log_every=10**9,
            sequence_parallel="sp" in tokens or "async" in tokens,
            loss_parallel="lp" in tokens,
            compile="compile" in tokens or "async" in tokens,
        )

    def build(self, flavor: str, batch: int, variant: str):
        from core.models import build_model
        from core.models.tp_styles import PrepareModuleInputCast, ReplicateParallel
        from core.training.strategy import single_device_build
        from core.training.train import make_optimizer, set_numerics
        from tp.build import build_tp

        tokens = set(variant.split("+"))
        one = "1gpu" in tokens
        cfg = self.cfg(flavor, batch, tokens, "reference" if one else "tp")
        set_numerics(cfg)
        torch.manual_seed(0)
        with torch.device(self.device):  # weights made on the device: seconds, not minutes, at 2.7b
            model = build_model("gpt", flavor, dropout=False)
        if "seqdim" in tokens:  # sequence parallel sharding dim 1 of (B, T, d), the copying layout
            model.sp_dim = 1
        if tokens & {"mixed", "fp32comm"}:
            plan_fn = model.tp_plan

            def plan(sp: bool = False, lp: bool = False) -> dict:
                out = {}
                for k, v in plan_fn(sp, lp).items():
                    if "mixed" in tokens and isinstance(v, ReplicateParallel):
                        continue  # without ReplicateParallel: replicated layers left plain tensors
                    if "fp32comm" in tokens and isinstance(v, PrepareModuleInputCast):
                        v.cast = False  # without the cast: collectives in the norms' float32
                    out[k] = v
                return out

            model.tp_plan = plan
        if cfg.compile:
            from torch._inductor import config as inductor_config

            inductor_config._micro_pipeline_tp = "async" in tokens
        if "async" in tokens:
            from torch.distributed._symmetric_memory import enable_symm_mem_for_group

            enable_symm_mem_for_group(self.state.submesh("tp").get_group().group_name)
        if cfg.compile:
            for block in model.blocks.values():
                block.compile()  # as core.training.train does: in place, before the style cuts the model
        built = single_device_build(model, cfg, self.device) if one else build_tp(model, cfg, self.state)
        opt = make_optimizer(cfg, [p for _, p in built.params], model)
        return cfg, model, built, opt

    def data(self, flavor: str, batch: int):
        from core.models.gpt import GPT_FLAVORS

        f = GPT_FLAVORS[flavor]
        g = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randint(0, f.vocab, (batch, f.seq_len), generator=g).to(self.device)
        y = torch.randint(0, f.vocab, (batch, f.seq_len), generator=g).to(self.device)
        return x, y, f.seq_len

    def one(self, flavor: str, batch: int, variant: str, busbw: float | None) -> dict:
        from torch.profiler import ProfilerActivity, profile, record_function

        row: dict = {"flavor": flavor, "batch": batch, "variant": variant}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t_build = time.perf_counter()
        cfg, model, built, opt = self.build(flavor, batch, variant)
        x, y, seq = self.data(flavor, batch)
        params = [p for _, p in built.params]
        row["params_all_dtensor"] = all(hasattr(p, "full_tensor") for p in params)
        row["optimizer"] = {"fused": opt.defaults.get("fused"), "foreach": opt.defaults.get("foreach")}

        def step(built=built, opt=opt):  # bound now: the names are deleted after the run
            loss = built.step(x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        losses = []
        t_warm = time.perf_counter()
        for _ in range(self.a.warmup + (2 if cfg.compile else 0)):
            losses.append(step())
        self.sync()
        row["build_and_warmup_s"] = round(time.perf_counter() - t_build, 1)
        row["warmup_s"] = round(time.perf_counter() - t_warm, 1)
        if self.world > 1 and "1gpu" not in variant:
            dist.barrier()
        t = time.perf_counter()
        for _ in range(self.a.steps):
            losses.append(step())
        self.sync()
        dt = (time.perf_counter() - t) / self.a.steps
        row["step_ms"] = round(dt * 1e3, 2)
        row["tokens_per_s"] = round(batch * seq / dt)
        row["loss_last"] = round(float(losses[-1]), 4)
        extras = built.result_extras()
        comm = extras.get("communication_first_step")
        if comm:
            row["comm_counts"] = comm.get("counts")
            row["comm_payload_bytes"] = comm.get("payload_bytes", {})
            row["comm_payload_gb"] = round(sum(comm.get("payload_bytes", {}).values()) / 1e9, 3)
            row["ideal_comm_ms"] = ideal_comm_ms(comm.get("payload_bytes", {}), busbw, self.world)
        # one profiled step
        if self.world > 1 and "1gpu" not in variant:
            dist.barrier()
        self.sync()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            with record_function("tp_profile:fwd_bwd"):
                loss = built.step(x, y)
            with record_function("tp_profile:optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.sync()
        path = os.path.join(self.tmp, f"{flavor}_{variant}.json")
        prof.export_chrome_trace(path)
        row["profile"] = summarise_trace(path)
        os.remove(path)
        if cfg.compile:
            from torch._dynamo.utils import counters

            row["dynamo"] = {
                "stats": dict(counters["stats"]),
                "graph_breaks": dict(sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])[:5]),
            }
            counters.clear()
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 1)
        del model, built, opt, params, loss, losses
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        if "compile" in variant or "async" in variant:
            torch._dynamo.reset()
        return row


def worker(rank: int, world: int, a: argparse.Namespace, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    from core.parallel import distributed

    r = Runner(a, rank, world)
    rows: list[dict] = []
    busbw = {}
    if r.cuda:
        busbw = bus_bandwidth(r.device, world)
    top = busbw.get("512MiB")
    try:
        for flavor, batch, variant in runs(a):
            try:
                row = r.one(flavor, int(batch), variant, top)
            except Exception as e:  # one variant failing (async TP, say) must not cost the others
                err = f"{type(e).__name__}: {e}"[:600]
                row = {"flavor": flavor, "batch": int(batch), "variant": variant, "error": err}
                gc.collect()
                if r.cuda:
                    torch.cuda.empty_cache()
            if rank == 0:
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
                p = row.get("profile", {})
                idle, cpu = p.get("gpu_idle_ms"), p.get("cpu_ms")
                print("   profile:", p.get("gpu_kernel_ms"), "idle", idle, "cpu", cpu, flush=True)
            rows.append(row)
            if rank == 0:  # after every run: a call cut short still leaves what it measured
                write(a, world, busbw, rows, quiet=True)
        if rank == 0:
            write(a, world, busbw, rows)
    finally:
        distributed.shutdown()


def ratios(rows: list[dict]) -> None:
    base = {(r["flavor"]): r.get("tokens_per_s") for r in rows if r["variant"] == "1gpu" and "tokens_per_s" in r}
    for r in rows:
        if r.get("tokens_per_s") and base.get(r["flavor"]):
            r["vs_1gpu"] = round(r["tokens_per_s"] / base[r["flavor"]], 3)


def table(rows: list[dict]) -> str:
    head = (
        "flavor variant            tok/s   vs1   step_ms | prof_ms  matmul  attn  nccl(ideal) optim  other  memcpy"
        "  idle | cpu fwd+bwd  cpu opt  peakGiB"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['flavor']:6} {r['variant']:16} ERROR {r['error'][:150]}")
            continue
        p = r.get("profile", {})
        k = p.get("gpu_kernel_ms", {})
        cpu = p.get("cpu_ms", {})
        lines.append(
            f"{r['flavor']:6} {r['variant']:16} {r['tokens_per_s']:>7,} {r.get('vs_1gpu', 0):5.2f}"
            f" {r['step_ms']:8.1f} |"
            f" {p.get('step_wall_ms', 0):7.1f} {k.get('matmul', 0):7.1f} {k.get('attention', 0):5.1f}"
            f" {k.get('nccl', 0):5.1f}({r.get('ideal_comm_ms') or 0:5.1f}) {k.get('optimizer', 0):5.1f}"
            f" {k.get('other', 0):6.1f} {k.get('memcpy/memset', 0):6.1f} {p.get('gpu_idle_ms', 0):6.1f} |"
            f" {cpu.get('fwd_bwd', 0):11.1f} {cpu.get('optimizer', 0):8.1f} {r.get('peak_gib', 0):8.1f}"
        )
    return "\n".join(lines)


def runs(a: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(flavor, batch, variant) in order: --plan 'F:B=v1,v2;F:B=v3' or every --flavors x --variants."""
    if a.plan:
        out = []
        for part in a.plan.split(";"):
            spec, _, variants = part.partition("=")
            flavor, batch = spec.split(":")
            out += [(flavor, batch, v) for v in variants.split(",") if v]
        return out
    return [(f.split(":")[0], f.split(":")[1], v) for f in a.flavors.split(",") for v in a.variants.split(",")]


def write(a: argparse.Namespace, world: int, busbw: dict, rows: list[dict], quiet: bool = False) -> None:
    ratios(rows)
    out = {
        "world": world,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": a.dtype,
        "steps_timed": a.steps,
        "warmup": a.warmup,
        "allreduce_busbw_gbps": {k: round(v / 1e9, 1) for k, v in busbw.items()},
        "notes": (
            "ms per step on rank 0; profile = one more step under torch.profiler (kernel times are the "
            "GPU's, CPU gaps are inflated by the profiler's own overhead); kinds of kernel: nccl, "
            "attention (flash/sdpa), matmul (gemm/nvjet/cutlass), optimizer (every kernel launched "
            "inside opt.step), other (element-wise, norms, loss, reductions); idle = profiled step wall "
            "minus the union of all kernels; ideal = counted collective payload at the measured 512 MiB "
            "all-reduce bus bandwidth"
        ),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    text = table(rows)
    with open(a.out + ".txt", "w") as f:
        bw = out["allreduce_busbw_gbps"]
        f.write(f"{out['device']} x{world}, torch {out['torch']}, {a.dtype}, all-reduce busbw {bw} GB/s\n")
        f.write(text + "\n")
    if not quiet:
        print(text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--flavors", default="356m:16,2.7b:8", help="FLAVOR:BATCH,...")
    ap.add_argument("--variants", default="1gpu,plain,sp,sp+lp,sp+compile")
    ap.add_argument("--plan", default=None, help="FLAVOR:BATCH=v1,v2;FLAVOR:BATCH=v3 (instead of the cross product)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "tp_profile_2xH200"))
    a = ap.parse_args()
    import torch.multiprocessing as mp

    from core.parallel.distributed import free_port

    mp.spawn(worker, args=(a.world, a, free_port()), nprocs=a.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
