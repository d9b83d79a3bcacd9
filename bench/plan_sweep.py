"""Is --plan right? Run every feasible candidate of one model several times and compare with the
predictions: the pick made without trials against the best measured, each prediction's error, the
spread between repeats.

    python bench/plan_sweep.py --repeats 3 --out runs/plan-sweep      # runs the sweeps, then summarises
    python bench/plan_sweep.py --summarise runs/plan-sweep/rep1 runs/plan-sweep/rep2
    python bench/plan_sweep.py --repredict runs/plan-sweep/rep1   # today's cost model, that sweep's runs
    python bench/plan_sweep.py --picture runs/plan-sweep/rep1 docs/plan-delay-4.png

Each repeat is ``jobs/submit.py --plan --trials 99`` (every feasible candidate run for --steps
steps as a real job) with the flags below, which docs/plan.md reports: delay uneven-wide on 4 gloo
processes, global batch 16, --device-memory 700K, pinned to 1F1B and DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = (
    "--plan --trials 99 --steps 20 --model delay --flavor uneven-wide --gpus 4 --device-memory 700K "
    "--schedule 1f1b --dp-mode ddp"
).split()


def run(out: str, repeats: int) -> list[str]:
    folders = []
    for i in range(repeats):
        folder = os.path.join(out, f"rep{i + 1}")
        cmd = [sys.executable, os.path.join(ROOT, "jobs", "submit.py"), *FLAGS, "--out", folder]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        folders.append(folder)
    return folders


def summarise(folders: list[str]) -> str:
    plans = [json.load(open(os.path.join(f, "plan.json"))) for f in folders]
    lines = [
        "| repeat | probed ms per message | pick (predicted best) | its measured ms | best measured | ms | "
        "pick / best | top five's worst error |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    by_name: dict[str, list[tuple[float, float]]] = {}
    for i, p in enumerate(plans):
        measured = [e for e in p["candidates"] if e.get("measured_step_s")]
        pick = next(e for e in measured if e["name"] == p["predicted_best"]["name"])
        best = min(measured, key=lambda e: e["measured_step_s"])
        lat = p["inputs"]["link"]["latency_s"]
        lines.append(
            f"| {i + 1} | {1e3 * lat:.2f} | {pick['name']} | {1e3 * pick['measured_step_s']:.1f} | {best['name']} | "
            f"{1e3 * best['measured_step_s']:.1f} | {pick['measured_step_s'] / best['measured_step_s']:.3f} |"
        )
        for e in measured:
            by_name.setdefault(e["name"], []).append((e["predicted_step_s"], e["measured_step_s"]))
        top5 = sorted(measured, key=lambda e: e["predicted_step_s"])[:5]
        worst = max(abs(e["prediction_error"]) for e in top5)
        lines[-1] += f" {100 * worst:.0f}% |"
    lines += ["", "| layout | predicted ms (each repeat) | measured ms (each repeat) | spread of measured | errors |"]
    lines.append("|---|---|---|---|---|")
    for name, pts in sorted(by_name.items(), key=lambda kv: statistics.mean(p for p, _ in kv[1])):
        ms = [m for _, m in pts]
        spread = (max(ms) - min(ms)) / statistics.mean(ms)
        lines.append(
            f"| {name} | {', '.join(f'{1e3 * p:.0f}' for p, _ in pts)} | {', '.join(f'{1e3 * m:.0f}' for m in ms)} | "
            f"{100 * spread:.0f}% | {', '.join(f'{100 * (p / m - 1):+.0f}%' for p, m in pts)} |"
        )
    return "\n".join(lines)


def repredict(folder: str) -> str:
    """Predict a finished sweep's candidates again with today's cost model and that sweep's link
    figures (no probe, no jobs), beside what its trials measured: a change to the model is judged
    on measurements already taken. Block times are profiled again on this host."""
    import dataclasses

    from core.config import RunConfig
    from jobs.plan.layouts import enumerate_layouts
    from jobs.plan.predict import Link, Profiles, predict, target_device

    plan = json.load(open(os.path.join(folder, "plan.json")))
    lk = plan["inputs"]["link"]
    link = Link(lk["latency_s"], lk["bytes_per_s"], lk["source"], lk.get("collective_step_latency_s"))
    base = RunConfig(model=plan["model"], flavor=plan["flavor"], gpus=plan["gpus"], batch_size=plan["batch_size"])
    measured = {e["name"]: e for e in plan["candidates"] if e.get("measured_step_s")}
    profiles = Profiles(base, target_device(base))
    rows = []
    for c in enumerate_layouts(base, set()):
        if c.name not in measured or c.layout is None:
            continue
        e = measured[c.name]
        cfg = dataclasses.replace(c.cfg, microbatches=e["microbatches"] if c.cfg.strategy == "pp" else None)
        pred = predict(cfg, c.layout, profiles, link, plan["device_memory_bytes"])
        rows.append((c.name, e["predicted_step_s"], pred.step_s, e["measured_step_s"]))
    rows.sort(key=lambda r: r[2])
    out = [
        "| layout | predicted then | predicted now | measured | error then | error now |",
        "|---|---|---|---|---|---|",
    ]
    for name, then, now, meas in rows:
        out.append(
            f"| {name} | {1e3 * then:.0f} | {1e3 * now:.0f} | {1e3 * meas:.0f} | {100 * (then / meas - 1):+.0f}% | "
            f"{100 * (now / meas - 1):+.0f}% |"
        )
    best = min(rows, key=lambda r: r[3])
    out.append(
        f"\npick now: {rows[0][0]} measured {1e3 * rows[0][3]:.1f} ms; best measured {best[0]} {1e3 * best[3]:.1f} ms"
    )
    return "\n".join(out)


def picture(folder: str, png: str) -> None:
    """A finished sweep's predicted-against-measured picture (what --plan --trials draws), drawn again."""
    from core.report.render import save_predicted_vs_measured

    plan = json.load(open(os.path.join(folder, "plan.json")))
    points = [
        (e["name"], e["predicted_step_s"], e["measured_step_s"]) for e in plan["candidates"] if e.get("measured_step_s")
    ]
    title = f"{plan['model']} {plan['flavor']}, {plan['gpus']} gloo processes: every feasible layout"
    save_predicted_vs_measured(points, png, title, plan["predicted_best"]["name"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join("runs", "plan-sweep"))
    ap.add_argument("--summarise", nargs="+", metavar="FOLDER", help="summarise finished sweeps only")
    ap.add_argument("--picture", nargs=2, metavar=("FOLDER", "PNG"), help="draw a finished sweep's plan.png anew")
    ap.add_argument("--repredict", metavar="FOLDER", help="today's cost model against a finished sweep's runs")
    args = ap.parse_args()
    if args.picture:
        picture(*args.picture)
        return
    if args.repredict:
        print(repredict(args.repredict))
        return
    folders = args.summarise or run(args.out, args.repeats)
    print(summarise(folders))


if __name__ == "__main__":
    main()
