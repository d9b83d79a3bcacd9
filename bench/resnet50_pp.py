"""ResNet-50 (torchvision, cut at its children) on 2 GPUs: mp and pipeline schedules against 1 GPU.

PyTorch's model-parallel tutorial measured naive placement 7% slower than one GPU and pipelined
input +49% for ResNet-50 on 2 GPUs; this runs the same comparison through the suite's own jobs
(submitit's local executor, one process per GPU, NCCL). FakeData 3x224x224 (``--flavor 224``),
10 classes; figures only, never pass/fail; writes bench/results/resnet50_pp_<n>gpu.json.

    python bench/resnet50_pp.py                         # 1 GPU, mp 2, gpipe/1f1b at m = 2, 4, 8
    python bench/resnet50_pp.py --batch 256 --dtype bf16
    python bench/resnet50_pp.py --device cpu --flavor tiny --batch 8 --steps 3 --ms 2   # a smoke run
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

from job_runner import pick, run_job  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--flavor", default="224", help="image size: tiny 32, small 64, 224")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--ms", default="2,4,8", help="micro-batch counts to try")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    rows = []

    def job(name: str, **kw) -> dict | None:
        rc, r = run_job(
            os.path.join(tmp, name),
            model=a.model,
            flavor=a.flavor,
            dataset="fakedata",  # no real 224 x 224 image set here; random images cost the same
            batch_size=a.batch,
            steps=a.steps,
            eval_samples=a.batch,
            dtype=a.dtype,
            device=a.device,
            **kw,
        )
        if rc:
            rows.append({"run": name, "error": f"exit {rc}"})
            print(json.dumps(rows[-1]), flush=True)
            return None
        row = {
            "run": name,
            "images_per_s": round(r["steady_samples_per_sec"], 1),
            "peak_gib_per_gpu": [round(b / 2**30, 2) for b in r["peak_memory_bytes"]],
            "final_loss": round(r["final_loss"], 4),
        }
        row.update(
            pick(r, ("stages", "microbatches", "bubble_fraction", "bubble_fraction_theory", "timeline_step_time_s"))
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        one = job("reference-1gpu", strategy="reference", gpus=1)
        job(f"mp-{a.gpus}gpu", strategy="mp", gpus=a.gpus)
        for schedule in [s for s in a.schedules.split(",") if s]:
            for m in (int(x) for x in a.ms.split(",") if x):
                if a.batch % m == 0 and m >= a.gpus:
                    job(f"pp-{schedule}-m{m}", strategy="pp", gpus=a.gpus, schedule=schedule, microbatches=m)
    if one:
        for row in rows:
            if "images_per_s" in row:
                row["vs_1gpu"] = round(row["images_per_s"] / one["images_per_s"], 3)
    out = {
        "model": a.model,
        "flavor": a.flavor,
        "batch": a.batch,
        "dtype": a.dtype,
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"resnet50_pp_{a.gpus}{'gpu' if a.device == 'cuda' else 'cpu'}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
