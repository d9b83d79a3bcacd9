"""Several GPUs of one host: pipeline bubble against theory, mp across real seams, tensor-parallel speedup.

Every run is a real job through submitit's local executor (one process per GPU, NCCL), like a
user's. gpt in bf16; figures only, never pass/fail; writes bench/results/multi_gpu_<n>.json.

    python bench/multi_gpu.py                       # uses every visible GPU
    python bench/multi_gpu.py --flavor 356m --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from core.models.gpt import GPT_FLAVORS  # noqa: E402

from job_runner import pick, run_job  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="356m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved-1f1b")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    n = torch.cuda.device_count()
    tokens = GPT_FLAVORS[a.flavor].seq_len
    rows = []

    def job(name: str, **kw) -> None:
        folder = os.path.join(tmp, name)
        rc, r = run_job(
            folder,
            model="gpt",
            flavor=a.flavor,
            batch_size=a.batch,
            steps=a.steps,
            dtype="bf16",
            device="cuda",
            **kw,
        )
        if rc:
            rows.append({"run": name, "error": f"exit {rc}"})
            return
        row = {
            "run": name,
            "tokens_per_s": round(r["steady_samples_per_sec"] * tokens),
            "peak_gib_per_gpu": [round(b / 2**30, 1) for b in r["peak_memory_bytes"]],
            "final_loss": round(r["final_loss"], 4),
        }
        keys = ("microbatches", "bubble_fraction", "bubble_fraction_theory", "timeline_step_time_s")
        row.update(pick(r, (*keys, "communication_first_step")))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if name == f"pp-1f1b-m{2 * n}" and os.path.exists(os.path.join(folder, "timeline.png")):
            import shutil

            os.makedirs(a.out, exist_ok=True)
            shutil.copy(os.path.join(folder, "timeline.png"), os.path.join(a.out, f"timeline_1f1b_{n}gpu.png"))

    with tempfile.TemporaryDirectory() as tmp:
        job("reference-1gpu", strategy="reference", gpus=1)
        job(f"mp-{n}gpu", strategy="mp", gpus=n)
        for schedule in [s for s in a.schedules.split(",") if s]:
            for m in (n, 2 * n, 4 * n):
                if a.batch % m == 0:
                    job(f"pp-{schedule}-m{m}", strategy="pp", gpus=n, schedule=schedule, microbatches=m)
        job(f"tp-{n}gpu", strategy="tp", gpus=n)
        if n >= 4:
            job("pp2xtp2", strategy="pp", gpus=4, tp=2, schedule="1f1b", microbatches=8)
    out = {
        "gpus": n,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "flavor": a.flavor,
        "batch": a.batch,
        "rows": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"multi_gpu_{n}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
