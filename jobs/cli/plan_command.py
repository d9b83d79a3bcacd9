"""``--plan``, ``--trials K``, ``--auto``: which layout to use, predicted, ranked and measured.

    python jobs/submit.py --plan --model delay --flavor uneven-wide --gpus 4 --device-memory 700K
    python jobs/submit.py --plan --trials 3 --model delay --flavor uneven-wide --gpus 4
    python jobs/submit.py --auto --model gpt --flavor 356m --gpus 2 --dtype bf16

Every layout (jobs/plan/layouts.py) gets a prediction (jobs/plan/predict.py); the feasible ones are
ranked by predicted step time, the best ten printed, and all of them, excluded ones with their
reason, written to plan.json. Trials run as real jobs through the same path as any run (like
``--compare``), each for a few steps with the planner's cut given as ``--split``, and the ranking
then follows the measured steady step time.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import sys

from core.check.metrics import read_result, write_json_atomic
from core.config import ConfigError, RunConfig
from core.report.render import save_predicted_vs_measured, table
from jobs.plan.cluster import resolve_cluster
from jobs.plan.layouts import AXES, Candidate, enumerate_layouts, reason_key
from jobs.plan.predict import Link, Profiles, device_budget, predict, probed_link, read_links, target_device
from jobs.plan.strategies import validate_run

TRIAL_STEPS = 10  # the first 4 are warm-up (core.training.train): 6 steady steps measured
SHOWN = 10


def _entry(c: Candidate, pred, batch: int, tokens: int | None) -> dict:
    step = pred.step_s if pred else None
    return {
        "name": c.name,
        "flags": c.flags(),
        "layout": c.layout.to_dict() if c.layout else None,
        "microbatches": pred.microbatches if pred else None,
        "split": pred.split if pred else None,
        "predicted_step_s": step,
        "predicted_samples_per_s": batch / step if step else None,
        "predicted_tokens_per_s": batch * tokens / step if step and tokens else None,
        "predicted_peak_bytes": pred.peak_bytes if pred else None,
        "predicted_memory": pred.memory if pred else None,
        "communication": pred.communication if pred else None,
        "fits": bool(pred and pred.fits and c.excluded_because is None),
        "excluded_because": c.excluded_because or (pred.excluded_because if pred else None),
    }


def _row(i: int, e: dict) -> dict:
    ms = lambda s: "-" if s is None else f"{1000 * s:.1f}"  # noqa: E731
    err = e.get("prediction_error")
    return {
        "#": i,
        "layout": e["name"],
        "split": ",".join(map(str, e["split"] or [])) or "-",
        "predicted ms": ms(e["predicted_step_s"]),
        "measured ms": ms(e.get("measured_step_s")),
        "error": "-" if err is None else f"{100 * err:+.0f}%",
        "samples/s": "-" if not e["predicted_samples_per_s"] else f"{e['predicted_samples_per_s']:.1f}",
        "peak MiB": "-" if e["predicted_peak_bytes"] is None else f"{e['predicted_peak_bytes'] / 2**20:.2f}",
        "traffic": " ".join(f"{k} {v['bytes'] / 2**20:.2f}MiB" for k, v in (e["communication"] or {}).items()) or "-",
    }


COLUMNS = ["#", "layout", "split", "predicted ms", "measured ms", "error", "samples/s", "peak MiB", "traffic"]


def choose_link(base: RunConfig, device, profiles: Profiles, link_rates: str | None, probe: bool) -> Link:
    """validate.json where given; on CPU a probe among the job's own processes (--gpus of them),
    where the job would run on this host; else assumed. A probe that fails leaves the assumed
    figures, and says why."""
    if link_rates is not None or device.type != "cpu" or base.gpus < 2 or not probe:
        return read_links(link_rates, device.type)
    if resolve_cluster(base) != "local":  # this host (a login node) is not where the ranks will talk
        return read_links(None, device.type)
    # one micro-batch's seam at the smallest micro-batches a candidate runs (p = gpus, m = 2p)
    rows = max(1, base.resolved_batch_size // (2 * base.gpus))
    try:
        return probed_link(base.gpus, max(profiles.seam_bytes()) * rows)
    except RuntimeError as e:
        print(f"note: the link probe failed ({e}): link latency assumed", flush=True)
        return read_links(None, device.type)


def make_plan(
    base: RunConfig, given: set[str], budget: float | None, link_rates: str | None, probe: bool = True
) -> dict:
    """Enumerate, predict and rank; the plan.json document (without trials)."""
    device = target_device(base)
    budget = device_budget(budget, device)
    profiles = Profiles(base, device)
    link = choose_link(base, device, profiles, link_rates, probe)
    batch, tokens = base.resolved_batch_size, profiles.tokens_per_sample()
    entries = []
    for c in enumerate_layouts(base, given):
        pred = predict(c.cfg, c.layout, profiles, link, budget) if c.layout else None
        if pred and pred.split is not None:  # the run takes the planner's cut, not its own
            c.cfg = dataclasses.replace(c.cfg, split=pred.split)
        if pred and c.cfg.strategy == "pp":
            c.cfg = dataclasses.replace(c.cfg, microbatches=pred.microbatches)
        entries.append(_entry(c, pred, batch, tokens))
    feasible = sorted((e for e in entries if e["fits"]), key=lambda e: e["predicted_step_s"])
    excluded = collections.Counter(reason_key(e["excluded_because"]) for e in entries if not e["fits"])
    return {
        "model": base.model,
        "flavor": base.flavor,
        "gpus": base.gpus,
        "nodes": base.nodes,
        "batch_size": batch,
        "dtype": base.dtype,
        "device_memory_bytes": budget,
        "device_memory_source": "given" if budget is not None and device.type == "cpu" else "device",
        "inputs": {
            "profile_device": str(device),
            "profiled_microbatch_sizes": profiles.sizes,
            "link": link.to_dict(),
            "measured": ["block forward/backward time", "activation bytes", "parameter bytes"]
            + (["pipeline message and all-reduce latency (" + link.source + ")"] if link.latency_measured else []),
            "assumed": (["link bandwidth"] if link.latency_measured else ["link latency and bandwidth"])
            if not link.source.startswith("validate.json")
            else ([] if link.latency_measured else ["link latency"]),
        },
        "candidates": feasible + [e for e in entries if not e["fits"]],
        "excluded": dict(excluded),
        "best": feasible[0] if feasible else None,
    }


def _cfg_of(base: RunConfig, entry: dict) -> RunConfig:
    """The run a candidate's flags describe, on top of the user's other options."""
    lay = entry["layout"]
    split = entry["split"]
    return dataclasses.replace(
        base,
        strategy=lay["strategy"],
        dp=lay["dp"] if lay["strategy"] != "dp" else None,
        tp=lay["tp"] if lay["strategy"] == "pp" else 1,
        dp_mode=lay["dp_mode"],
        microbatches=entry["microbatches"] if lay["strategy"] == "pp" else None,
        schedule=next((f for f, p in zip(entry["flags"][1:], entry["flags"]) if p == "--schedule"), base.schedule),
        sequence_parallel="--sequence-parallel" in entry["flags"],
        split=split,
        balance=None,
    )


def run_trials(plan: dict, base: RunConfig, k: int, folder: str, run_one) -> None:
    """Run the K best predicted candidates for a few steps each; add measurements and re-rank."""
    trial_base = base if base.steps is not None else dataclasses.replace(base, steps=TRIAL_STEPS, epochs=None)
    feasible = [e for e in plan["candidates"] if e["fits"]]
    for i, e in enumerate(feasible[:k]):
        cfg = dataclasses.replace(_cfg_of(trial_base, e), out=os.path.join(folder, "trials", f"{i + 1:02d}"))
        print(f"--- trial {i + 1}/{min(k, len(feasible))}: {e['name']}  ({' '.join(e['flags'])})", flush=True)
        rc, run_folder = run_one(cfg, quiet=True)
        if rc != 0:
            e["measured_step_s"], e["trial_error"] = None, f"exit {rc}"
            continue
        r = read_result(run_folder)
        rate = r.get("steady_samples_per_sec") or r["samples_per_sec"]
        e["measured_step_s"] = base.resolved_batch_size * base.grad_accum / rate
        e["measured_peak_bytes"] = r["peak_memory_bytes"]
        e["measured_peak_kind"] = r["peak_memory_kind"]
        e["prediction_error"] = e["predicted_step_s"] / e["measured_step_s"] - 1
        e["trial_folder"] = run_folder
    measured = sorted((e for e in feasible if e.get("measured_step_s")), key=lambda e: e["measured_step_s"])
    rest = [e for e in plan["candidates"] if e not in measured]
    plan["candidates"] = measured + rest
    plan["predicted_best"] = plan["best"]
    plan["best"] = measured[0] if measured else plan["best"]
    plan["trials"] = len([e for e in feasible[:k]])


def plan_command(base: RunConfig, actions, given: set[str], run_one) -> int:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = os.path.abspath(base.out or os.path.join("runs", f"plan-{stamp}"))
    if os.path.exists(os.path.join(folder, "plan.json")):
        print(f"error: --out {folder} already holds a plan: choose another folder", file=sys.stderr, flush=True)
        return 2
    if actions.trials < 0:
        print(f"error: --trials must be 0 or more (got {actions.trials})", file=sys.stderr, flush=True)
        return 2
    try:  # a mistake every candidate shares (--gpus 0, an unknown model) is one line, before profiling
        validate_run(dataclasses.replace(base, strategy="reference", gpus=1, dp=None, tp=1, split=None))
        plan = make_plan(base, given & set(AXES), actions.device_memory, actions.link_rates)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    os.makedirs(folder, exist_ok=True)
    if actions.trials:
        run_trials(plan, base, actions.trials, folder, run_one)
    _report(plan, base, folder)
    path = os.path.join(folder, "plan.json")
    write_json_atomic(path, plan)
    print(f"\nplan in {path}" + (f" and {os.path.join(folder, 'plan.png')}" if actions.trials else ""), flush=True)
    if not actions.auto:
        return 0
    if plan["best"] is None:
        print("error: no layout fits: use more --gpus or a larger --device-memory", file=sys.stderr, flush=True)
        return 2
    best = plan["best"]
    cfg = dataclasses.replace(_cfg_of(base, best), out=os.path.join(folder, "run"))
    print(f"\n--- running the pick: {best['name']}  ({' '.join(best['flags'])})", flush=True)
    rc, run_folder = run_one(cfg)
    if rc == 0 and run_folder:
        result = read_result(run_folder)
        result["plan"] = {
            "plan_json": path,
            "name": best["name"],
            "flags": best["flags"],
            "predicted_step_s": best["predicted_step_s"],
            "measured_in_trial_s": best.get("measured_step_s"),
        }
        write_json_atomic(os.path.join(run_folder, "result.json"), result)
    return rc


def _report(plan: dict, base: RunConfig, folder: str) -> None:
    rows = [_row(i + 1, e) for i, e in enumerate(plan["candidates"][:SHOWN]) if e["fits"]]
    budget = plan["device_memory_bytes"]
    limit = "no memory limit" if budget is None else f"{budget / 2**20:.2f} MiB per device"
    link = plan["inputs"]["link"]
    print(
        f"\n{base.model} {base.flavor} on {base.gpus} devices, global batch {plan['batch_size']}, {limit}; "
        f"blocks profiled on {plan['inputs']['profile_device']}, link {link['bytes_per_s'] / 1e9:g} GB/s "
        f"{1e3 * link['latency_s']:g} ms ({link['source']})"
    )
    print(table(rows, COLUMNS) if rows else "no layout fits")
    feasible = sum(e["fits"] for e in plan["candidates"])
    print(
        f"{feasible} feasible layout(s); excluded: "
        + (", ".join(f"{n} x {why}" for why, n in plan["excluded"].items()) or "none")
    )
    if plan["best"]:
        print(f"best: {plan['best']['name']}: python jobs/submit.py {' '.join(plan['best']['flags'])}")
    points = [
        (e["name"], e["predicted_step_s"], e["measured_step_s"]) for e in plan["candidates"] if e.get("measured_step_s")
    ]
    if points:
        title = f"{base.model} {base.flavor}, {base.gpus} devices: predicted against measured step time"
        pick = (plan.get("predicted_best") or plan["best"])["name"]
        save_predicted_vs_measured(points, os.path.join(folder, "plan.png"), title, pick)
