"""Pipeline overlap on the delay model: measured step time against the ideal (m+p-1)(f+b).

Each stage's forward waits f, its backward 2f, so the textbook cost of a GPipe or 1F1B step is
(m+p-1)(f+b) and its idle share (p-1)/(m+p-1). Prints one row per (schedule, p, m) and keeps the
table in bench/results/. Figures, never pass/fail.

    python bench/pipeline_overlap.py                 # CPU (gloo), about 2 minutes
    python bench/pipeline_overlap.py --device cuda   # one process per GPU (needs p GPUs)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from core.models.delay import DELAY_FLAVORS  # noqa: E402
from core.report.render import table  # noqa: E402

from job_runner import run_job  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flavor", default="tiny")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    flavor = DELAY_FLAVORS[a.flavor]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for schedule in a.schedules.split(","):
            for p in (int(r) for r in a.ranks.split(",")):
                # one stage's forward of one micro-batch of 4 samples (batch 4m): the delay costs per sample
                f_ms = sum(flavor.forward_ms(i, 4) for i in range(flavor.blocks)) / p
                for m in (p, 2 * p, 4 * p):
                    rc, r = run_job(
                        os.path.join(tmp, f"{schedule}-{p}-{m}"),
                        strategy="pp",
                        gpus=p,
                        model="delay",
                        flavor=a.flavor,
                        schedule=schedule,
                        microbatches=m,
                        batch_size=4 * m,
                        steps=4,
                        device=a.device,
                        log_every=1000,
                    )
                    if rc:
                        rows.append({"schedule": schedule, "p": p, "m": m, "step ms": "failed"})
                        continue
                    ideal = (m + p - 1) * 3 * f_ms  # f + b = f + 2f
                    step = 1000 * r["timeline_step_time_s"]
                    rows.append(
                        {
                            "schedule": schedule,
                            "p": p,
                            "m": m,
                            "ideal ms": f"{ideal:.1f}",
                            "step ms": f"{step:.1f}",
                            "step/ideal": f"{step / ideal:.3f}",
                            "bubble theory": f"{100 * r['bubble_fraction_theory']:.1f}%",
                            "bubble measured": f"{100 * r['bubble_fraction']:.1f}%",
                        }
                    )
                    print(rows[-1], flush=True)
    cols = ["schedule", "p", "m", "ideal ms", "step ms", "step/ideal", "bubble theory", "bubble measured"]
    import torch

    head = (
        f"delay model '{a.flavor}' ({flavor.blocks} blocks x {flavor.ms_per_sample} ms per sample forward, 2x back), "
        f"device {a.device}, torch {torch.__version__}, {datetime.date.today()}"
    )
    text = head + "\n" + table(rows, cols)
    print("\n" + text)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"pipeline_overlap_{a.device}.txt"), "w") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
