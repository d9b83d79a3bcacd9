"""``--compare``: mp and every pipeline schedule on the same model, one table and one picture.

This is how a user picks a schedule: the same model, devices and global batch under each, the
measured step time, throughput against mp, and bubble beside the textbook figures, and the
timelines stacked on one time axis. Where balancing by time cuts the model differently from
balancing by parameters, that run is repeated with ``--balance params`` and shown beside it, so
the gain of the cut is measured, not claimed.

    python jobs/submit.py --compare --gpus 4 --model delay
    python jobs/submit.py --compare --gpus 4 --model delay --flavor uneven
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys

from core.check.metrics import read_result, write_json_atomic
from core.config import ConfigError, RunConfig
from core.report.curves import save_overlaid_losses
from core.report.render import save_stacked_timelines, table
from jobs.plan.strategies import validate_run
from pp.schedules import SCHEDULES

COLUMNS = [
    "run",
    "balance",
    "microbatches",
    "step ms",
    "predicted ms",
    "samples/s",
    "vs mp",
    "vs mp theory",
    "bubble measured",
    "bubble theory",
    "peak MiB per rank",
    "final loss",
]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _actions(run_folder: str) -> list[dict]:
    """The recorded actions of a run, read back from its timeline.json (Chrome trace)."""
    with open(os.path.join(run_folder, "timeline.json")) as f:
        trace = json.load(f)
    return [
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


def _row(name: str, r: dict, mp_step: float | None) -> dict:
    step = r.get("timeline_step_time_s")
    bal = r.get("balance") or {}
    predicted = (bal.get("predicted") or {}).get("step_time_s")
    # throughput of the recorded steps: the same global batch in every run, so step time decides
    samples = r["config"]["batch_size"] / step if step else None
    theory = r.get("bubble_fraction_theory")
    ranks = len(r["stages"]) if r["strategy"] == "mp" else r.get("pipeline_ranks", 1)
    # mp keeps one of p devices busy; a pipeline keeps (1 - bubble) of them: p (1 - bubble) times mp
    vs_theory = 1.0 if r["strategy"] == "mp" else (None if theory is None else ranks * (1 - theory))
    return {
        "run": name,
        "balance": f"{bal.get('balance', '-')} {','.join(map(str, bal.get('split', [])))}".strip(),
        "microbatches": r.get("microbatches", 1),
        "step ms": "-" if step is None else f"{1000 * step:.1f}",
        "predicted ms": "-" if predicted is None else f"{1000 * predicted:.1f}",
        "samples/s": "-" if samples is None else f"{samples:.1f}",
        "vs mp": "-" if not (step and mp_step) else f"{mp_step / step:.2f}x",
        "vs mp theory": "-" if vs_theory is None else f"{vs_theory:.2f}x",
        "bubble measured": _pct(r.get("bubble_fraction")),
        "bubble theory": _pct(theory),
        "peak MiB per rank": " ".join(f"{b / 2**20:.0f}" for b in r["peak_memory_bytes"]),
        "final loss": f"{r['final_loss']:.4f}",
    }


def compare(base: RunConfig, run_one) -> int:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.path.abspath(base.out or os.path.join("runs", f"compare-{stamp}"))
    if os.path.exists(os.path.join(folder, "compare.json")):
        print(f"error: --out {folder} already holds a comparison: choose another folder", flush=True)
        return 2
    if base.steps is None and base.epochs is None:
        base = dataclasses.replace(base, steps=4)  # a comparison needs a few steps, not an epoch
    variants = [("mp", dataclasses.replace(base, strategy="mp", tp=1))]
    try:  # a mistake every variant shares (--gpus 0, ...) is one line before anything runs
        validate_run(variants[0][1])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    variants += [(s, dataclasses.replace(base, strategy="pp", schedule=s)) for s in SCHEDULES]
    # the other balance is worth a run only when nothing fixed the cut and time chose another one
    twin_params = base.balance is None and base.split is None
    rows, panels, curves, code, mp_step = [], [], [], 0, None
    while variants:
        name, cfg = variants.pop(0)
        cfg = dataclasses.replace(cfg, out=os.path.join(folder, name.replace(" ", "-")))
        print(f"--- {name}", flush=True)
        rc, run_folder = run_one(cfg, quiet=True)
        if rc != 0:
            rows.append({"run": name, "step ms": "skipped (see the error above)"})
            code = code if rc == 2 else rc
            continue
        r = read_result(run_folder)
        if name == "mp":
            mp_step = r.get("timeline_step_time_s")
        rows.append(_row(name, r, mp_step))
        curves.append((name, r["losses"]))
        bal = r.get("balance") or {}
        if twin_params and bal.get("balance") == "time" and bal.get("split") != bal.get("params_split"):
            variants.insert(0, (f"{name} params", dataclasses.replace(cfg, balance="params")))
        panels.append(
            (
                f"{name} ({rows[-1]['balance']}): bubble {rows[-1]['bubble measured']} measured, "
                f"{rows[-1]['bubble theory']} theory",
                _actions(run_folder),
            )
        )
    text = table(rows, COLUMNS)
    print(f"\n{base.model} {base.flavor} on {base.gpus} devices, global batch {base.resolved_batch_size}\n{text}")
    if panels:
        save_stacked_timelines(panels, os.path.join(folder, "compare.png"))
    if curves:
        save_overlaid_losses(curves, os.path.join(folder, "compare-losses.png"))
    write_json_atomic(
        os.path.join(folder, "compare.json"),
        {"model": base.model, "flavor": base.flavor, "gpus": base.gpus, "rows": rows},
    )
    print(f"\ncomparison in {folder}/compare.json, compare.png (timelines) and compare-losses.png (loss curves)")
    return code
