"""Data parallel against one GPU: is it worth it, and FSDP2 or DDP? Figures only, never pass/fail.

Every run is a real job through submitit's local executor (one process per GPU, NCCL), like a
user's: gpt in bf16, the same GLOBAL batch on 1 GPU and on dp replicas (strong scaling), steady
tokens/s and peak memory per GPU. With 4 GPUs it adds dp 2 x pp 2 and dp 2 x tp 2. Writes
bench/results/data_parallel_<n>gpu.json.

    python bench/data_parallel.py                          # gpt 356m, global batches 16 and 32
    python bench/data_parallel.py --flavor 124m --batches 32 --steps 12
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

from job_runner import run_job  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="356m")
    ap.add_argument("--batches", default="16,32", help="global batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    n = torch.cuda.device_count()
    seq = GPT_FLAVORS[a.flavor].seq_len
    rows = []

    def job(tmp: str, name: str, batch: int, **kw) -> dict:
        rc, r = run_job(
            os.path.join(tmp, f"{name}-b{batch}"),
            model="gpt",
            flavor=a.flavor,
            batch_size=batch,
            steps=a.steps,
            dtype="bf16",
            device="cuda",
            **kw,
        )
        row: dict = {"run": name, "global_batch": batch}
        if rc:
            row["error"] = f"exit {rc}"
        else:
            row.update(
                tokens_per_s=round(r["steady_samples_per_sec"] * seq),
                peak_gib_per_gpu=[round(b / 2**30, 1) for b in r["peak_memory_bytes"]],
                final_loss=round(r["final_loss"], 4),
                layout=r["layout"],
                communication_per_axis=r.get("communication_per_axis"),
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "communication_per_axis"}), flush=True)
        return row

    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in a.batches.split(",")]:
            one = job(tmp, "1gpu", batch, strategy="reference", gpus=1)
            runs = [job(tmp, f"dp{n}-{mode}", batch, strategy="dp", gpus=n, dp_mode=mode) for mode in ("fsdp", "ddp")]
            if n >= 4:
                runs.append(job(tmp, "dp2xpp2", batch, strategy="pp", gpus=4, dp=2, microbatches=4))
                runs.append(job(tmp, "dp2xtp2", batch, strategy="tp", gpus=4, dp=2, tp=2))
            for r in runs:
                if "tokens_per_s" in r and "tokens_per_s" in one:
                    r["speedup_vs_1gpu"] = round(r["tokens_per_s"] / one["tokens_per_s"], 3)
                    print(f"{r['run']} batch {batch}: {r['speedup_vs_1gpu']}x of one GPU", flush=True)
    out = {"gpus": n, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "flavor": a.flavor}
    out["rows"] = rows
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"data_parallel_{n}gpu.json"), "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
