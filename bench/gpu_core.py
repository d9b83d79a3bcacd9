"""Is the training core fast on one GPU? Our figures beside the hardware's and a bare loop's.

  b. mp with all stages on one device vs the plain model (reference): overhead ratio;
  c. the training core vs a bare hand-written loop, mnist-cnn, 469 steps of batch 128, data on GPU;
  d. gpt: tokens/s and MFU against the bf16 matmul rate measured in this same run.

Prints figures and writes bench/results/gpu_core.json; never pass/fail. Run on a GPU node:

    python bench/gpu_core.py                      # all parts
    python bench/gpu_core.py --parts d --flavors 124m,1.3b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from core.config import RunConfig  # noqa: E402
from core.data import Dataset, Split  # noqa: E402
from core.models import build_model  # noqa: E402
from core.models.gpt import GPT_FLAVORS  # noqa: E402
from core.parallel.distributed import DistState  # noqa: E402
from core.parallel.layout import Layout  # noqa: E402
from core.training.train import run  # noqa: E402
from jobs.plan.strategies import get_build  # noqa: E402

DEV = torch.device("cuda", 0)


def matmul_peak() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(30):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 30 / (time.perf_counter() - t)


def mnist_shaped(n: int) -> Dataset:
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    return Dataset(Split(x, y), None, "mnist-shaped noise")


def core_run(dataset: Dataset | None = None, **kw) -> dict:
    cfg = RunConfig(device="cuda", log_every=10**9, **kw)
    return run(cfg, DistState(Layout.from_config(cfg), device=DEV), get_build(cfg.strategy), dataset=dataset)


def bare_mnist_epoch(data: Dataset, steps: int, batch: int, tf32: bool) -> float:
    """The anchor's loop (shared/bench/mnist_cnn_bare_loop.py) on our model: the floor to compare with.

    tf32: cuDNN's default lets convolutions use TF32; the core's fp32 turns it off (parity). Both
    are measured so the comparison is like for like."""
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    m = build_model("mnist-cnn").to(DEV)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x = data.train.x[: steps * batch].to(DEV).view(steps, batch, 1, 28, 28)
    y = data.train.y[: steps * batch].to(DEV).view(steps, batch)
    times = []
    for _ in range(2):  # the second epoch is the warm one
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            F.nll_loss(m(x[i]), y[i]).backward()
            opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[-1]


def part_b_c(out: dict) -> None:
    steps, batch = 469, 128
    data = mnist_shaped(steps * batch)
    bare_tf32 = bare_mnist_epoch(data, steps, batch, tf32=True)
    bare = bare_mnist_epoch(data, steps, batch, tf32=False)
    rows = {}
    for strategy, gpus in (("reference", 1), ("mp", 3)):
        runs = [
            core_run(strategy=strategy, gpus=gpus, model="mnist-cnn", steps=steps, batch_size=batch, dataset=data)
            for _ in range(2)
        ]
        r = runs[-1]
        epoch_s = steps * batch / r["steady_samples_per_sec"]
        rows[strategy] = {"epoch_s": epoch_s, "train_time_s": r["train_time_s"]}
    out["c_core_vs_bare_mnist"] = {
        "bare_epoch_s_tf32_convs": bare_tf32,
        "bare_epoch_s": bare,
        "core_epoch_s": rows["reference"]["epoch_s"],
        "ratio_core_over_bare": rows["reference"]["epoch_s"] / bare,
    }
    out["b_mp_one_device_overhead_mnist"] = {
        "reference_epoch_s": rows["reference"]["epoch_s"],
        "mp3_on_one_gpu_epoch_s": rows["mp"]["epoch_s"],
        "ratio_mp_over_reference": rows["mp"]["epoch_s"] / rows["reference"]["epoch_s"],
    }
    print(
        json.dumps({k: out[k] for k in ("c_core_vs_bare_mnist", "b_mp_one_device_overhead_mnist")}, indent=1),
        flush=True,
    )


def gpt_flops_per_token(flavor: str) -> float:
    """6 N + 12 L d T (PaLM appendix B), N = the parameters that multiply (lookup tables excluded),
    the accounting of shared/bench/gpt_anchor.py (whose tied embedding counts once, as our head)."""
    f = GPT_FLAVORS[flavor]
    m = build_model("gpt", flavor)
    n = sum(p.numel() for p in m.parameters()) - f.vocab * f.dim - f.seq_len * f.dim
    return 6 * n + 12 * f.layers * f.dim * f.seq_len


def part_d(out: dict, peak: float, flavors: list[str], batches: dict) -> None:
    rows = []
    for flavor in flavors:
        for compile_ in (False, True):
            for strategy, gpus in (("reference", 1), ("mp", 2)):
                if strategy == "mp" and compile_:
                    continue
                try:
                    r = core_run(
                        strategy=strategy,
                        gpus=gpus,
                        model="gpt",
                        flavor=flavor,
                        steps=15,
                        batch_size=batches[flavor],
                        dtype="bf16",
                        compile=compile_,
                    )
                    tps = r["steady_samples_per_sec"] * GPT_FLAVORS[flavor].seq_len
                    mfu = tps * gpt_flops_per_token(flavor) / peak
                    row = {
                        "flavor": flavor,
                        "strategy": strategy,
                        "compile": compile_,
                        "batch": batches[flavor],
                        "tokens_per_s": round(tps),
                        "mfu": round(mfu, 4),
                        "peak_mem_gib": round(max(r["peak_memory_bytes"]) / 2**30, 1),
                        "final_loss": round(r["final_loss"], 3),
                    }
                except Exception as e:  # e.g. out of memory: say so and go on
                    row = {
                        "flavor": flavor,
                        "strategy": strategy,
                        "compile": compile_,
                        "error": f"{type(e).__name__}: {str(e)[:160]}",
                    }
                print(json.dumps(row), flush=True)
                rows.append(row)
                torch.cuda.empty_cache()
    out["d_gpt_one_gpu"] = rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="bcd")
    ap.add_argument("--flavors", default="124m,356m,1.3b")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "gpu_core.json"))
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak()
    out = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "bf16_matmul_tflops": peak / 1e12,
    }
    print(json.dumps(out), flush=True)
    if "b" in a.parts or "c" in a.parts:
        part_b_c(out)
    if "d" in a.parts:
        part_d(out, peak, a.flavors.split(","), {"small": 32, "124m": 32, "356m": 16, "1.3b": 8, "2.7b": 8})
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
