"""``--compare``: mp and every pipeline schedule on the same model, one table and one picture.

This is how a user picks a schedule: the same model, devices and batch under each, the measured
step time and bubble beside the textbook bubble, and the timelines stacked on one time axis.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

from core.config import RunConfig
from core.metrics import read_result, write_json_atomic
from core.report import save_stacked_timelines, table
from pp.schedules import SCHEDULES


def compare(base: RunConfig, run_one) -> int:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.path.abspath(base.out or os.path.join("runs", f"compare-{stamp}"))
    if os.path.exists(os.path.join(folder, "compare.json")):
        print(f"error: --out {folder} already holds a comparison: choose another folder", flush=True)
        return 2
    if base.steps is None and base.epochs is None:
        base = dataclasses.replace(base, steps=4)  # a comparison needs a few steps, not an epoch
    variants = [("mp", dataclasses.replace(base, strategy="mp", tp=1))]
    variants += [(s, dataclasses.replace(base, strategy="pp", schedule=s)) for s in SCHEDULES]
    rows, panels, code = [], [], 0
    for name, cfg in variants:
        cfg = dataclasses.replace(cfg, out=os.path.join(folder, name))
        print(f"--- {name}", flush=True)
        rc, run_folder = run_one(cfg, quiet=True)
        if rc != 0:
            rows.append({"run": name, "step ms": "skipped (see the error above)"})
            code = code if rc == 2 else rc
            continue
        r = read_result(run_folder)
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
        step = r.get("timeline_step_time_s")
        rows.append(
            {
                "run": name,
                "microbatches": r.get("microbatches", 1),
                "step ms": "-" if step is None else f"{1000 * step:.1f}",
                "bubble measured": pct(r.get("bubble_fraction")),
                "bubble theory": pct(r.get("bubble_fraction_theory")),
                "peak MiB per rank": " ".join(f"{b / 2**20:.0f}" for b in r["peak_memory_bytes"]),
                "final loss": f"{r['final_loss']:.4f}",
            }
        )
        with open(os.path.join(run_folder, "timeline.json")) as f:
            trace = json.load(f)
        acts = [
            dict(
                rank=e["tid"],
                step=e["args"]["step"],
                stage=e["args"]["stage"],
                kind=e["name"][0],
                microbatch=e["args"]["microbatch"],
                start=e["ts"] / 1e6,
                end=(e["ts"] + e["dur"]) / 1e6,
            )
            for e in trace["traceEvents"]
            if e["ph"] == "X"
        ]
        panels.append(
            (
                f"{name}: bubble {pct(r.get('bubble_fraction'))} measured, "
                f"{pct(r.get('bubble_fraction_theory'))} theory",
                acts,
            )
        )
    columns = ["run", "microbatches", "step ms", "bubble measured", "bubble theory", "peak MiB per rank", "final loss"]
    text = table(rows, columns)
    print(f"\n{base.model} on {base.gpus} devices\n{text}")
    if panels:
        save_stacked_timelines(panels, os.path.join(folder, "compare.png"))
    write_json_atomic(os.path.join(folder, "compare.json"), {"model": base.model, "gpus": base.gpus, "rows": rows})
    print(f"\ncomparison in {folder}/compare.json and compare.png")
    return code
