"""--plan: every layout enumerated, memory predicted as the model declares it, fits judged against the
budget, the pick's flags run as given; with trials, predictions against real runs (slow)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from core.config import RunConfig
from jobs.cli.parser import parse
from jobs.cli.plan_command import make_plan, run_trials
from jobs.plan.strategies import validate_run
from jobs.submit import main, run_one

KIB = 1024
# delay uneven-wide declares its size: 4096 fp32 weights per block (16 KiB) and, per sample, a
# 16 KiB input each block keeps for backward; the last block's loss (mse) keeps its output and
# target too. SGD without momentum: no optimizer state.
BLOCK_PARAMS = 16 * KIB
BUDGET = 700 * KIB


def act_bytes(block: int, rows: int) -> int:
    return rows * 16 * KIB * (3 if block == 7 else 1)


def true_peak(entry: dict) -> int:
    """The fullest device's bytes, from the model's declaration alone."""
    lay, m = entry["layout"], entry["microbatches"]
    local = 16 // lay["dp"]
    if lay["strategy"] == "dp":
        weights = 8 * BLOCK_PARAMS / (lay["dp"] if lay["dp_mode"] == "fsdp" else 1)
        gathered = BLOCK_PARAMS if lay["dp_mode"] == "fsdp" else 0
        return 2 * (weights + gathered) + sum(act_bytes(b, local) for b in range(8))
    split, n = entry["split"], lay["stages"]
    rows = local // m
    p, v_shape = lay["pp"], any(s in entry["flags"] for s in ("zbv-zero-bubble", "dualpipev"))
    per_rank: dict[int, int] = {}
    start = 0
    for stage, k in enumerate(split):
        if lay["strategy"] == "mp":
            held, owner = 1, stage
        else:
            held = m if "gpipe" in entry["flags"] else min(m, n - stage)
            owner = (stage if stage < p else 2 * p - 1 - stage) if v_shape else stage % p
        need = 2 * k * BLOCK_PARAMS + sum(act_bytes(b, rows) * held for b in range(start, start + k))
        per_rank[owner] = per_rank.get(owner, 0) + need
        start += k
    return max(per_rank.values())


@pytest.fixture(scope="module")
def plan():
    # pinned to ddp, so the cases are fewer: dp, mp, every schedule and micro-batch count, tp refused
    base = RunConfig(model="delay", flavor="uneven-wide", gpus=4, dp_mode="ddp")
    # no link probe: memory and the ranking's bookkeeping do not depend on it (the probe is below)
    return make_plan(base, {"dp_mode"}, BUDGET, None, probe=False)


def test_every_layout_is_counted_and_memory_is_what_the_model_declares(plan):
    cands = plan["candidates"]
    predicted = [e for e in cands if e["predicted_peak_bytes"] is not None]
    assert {e["layout"]["strategy"] for e in predicted} >= {"dp", "mp", "pp"}
    for e in predicted:
        if e["layout"]["dp_mode"] in (None, "ddp"):
            assert e["predicted_peak_bytes"] == pytest.approx(true_peak(e)), e["name"]
        # a candidate predicted not to fit is one whose true need exceeds the budget, and back
        split_refused = e["excluded_because"] == "no split of the blocks fits the memory budget"
        if not split_refused:
            assert e["fits"] == (true_peak(e) <= BUDGET), e["name"]
        else:  # refused for want of a cut: every contiguous cut of the 8 blocks needs more than the budget
            n = e["layout"]["stages"]
            cuts = [c for c in itertools.product(range(1, 9), repeat=n) if sum(c) == 8]
            assert min(true_peak({**e, "split": list(c)}) for c in cuts) > BUDGET, e["name"]
    # layouts differ in memory: the whole-model replicas and GPipe's full batch in flight do not fit
    names = {e["name"]: e for e in cands}
    assert not names["dp dp4 ddp"]["fits"] and names["pp pp4 1f1b m8"]["fits"]
    assert plan["excluded"]["--model delay has no tensor-parallel plan, so every rank would train the whole model"]
    ranked = [e["predicted_step_s"] for e in cands if e["fits"]]
    assert ranked == sorted(ranked) and plan["best"] is cands[0]
    assert plan["inputs"]["assumed"] == ["link latency and bandwidth"]


def test_the_picks_flags_run_as_given(plan):
    best = plan["best"]
    cfg, _, _ = parse(["--model", "delay", "--flavor", "uneven-wide", *best["flags"]])
    layout = validate_run(cfg)
    assert layout.to_dict() == best["layout"] and cfg.split == best["split"]
    json.dumps(plan)  # plan.json holds plain data


def test_the_fastest_and_slowest_predicted_run_in_that_order_and_near_their_predictions(tmp_path):
    """CPU, 2 gloo processes, the link probed among them: the layout predicted fastest and the one
    predicted slowest, each run as a real job, measure in that order, and each near its prediction.
    (The strict figures, every candidate of 4 processes, are the slow test below and docs/plan.md.)"""
    base = RunConfig(model="delay", flavor="uneven-wide", gpus=2, dp_mode="ddp", schedule="1f1b")
    plan = make_plan(base, {"dp_mode", "schedule"}, None, None)
    assert plan["inputs"]["link"]["source"] == "probe: 2 gloo processes"
    assert any("latency" in what for what in plan["inputs"]["measured"])
    assert plan["inputs"]["assumed"] == ["link bandwidth"]
    feasible = [e for e in plan["candidates"] if e["fits"]]
    fast, slow = feasible[0], feasible[-1]
    # the delay model's waits make these two far apart (dp 2 overlaps everything, mp nothing)
    assert slow["predicted_step_s"] > 1.5 * fast["predicted_step_s"], [e["name"] for e in feasible]
    plan["candidates"] = [fast, slow]
    run_trials(plan, dataclasses.replace(base, steps=10), 2, str(tmp_path), run_one)
    assert fast["measured_step_s"] < slow["measured_step_s"], (fast, slow)
    # 35%: a shared 2-core CI host; on an idle one the errors are a few percent (docs/plan.md)
    for e in (fast, slow):
        assert abs(e["prediction_error"]) < 0.35, (e["name"], e["predicted_step_s"], e["measured_step_s"])


def test_auto_runs_the_pick_and_its_result_names_the_plan(tmp_path):
    out = tmp_path / "auto"
    argv = f"--auto --model delay --flavor tiny --gpus 2 --steps 3 --out {out}"
    assert main(argv.split()) == 0
    plan = json.loads((out / "plan.json").read_text())
    result = json.loads((out / "run" / "result.json").read_text())
    best = plan["best"]
    assert result["plan"]["flags"] == best["flags"] and result["plan"]["name"] == best["name"]
    assert result["plan"]["plan_json"] == str(out / "plan.json")
    # the run is the pick: its layout, its cut
    assert result["layout"] == best["layout"] and result["steps"] == 3
    if best["split"]:
        assert result["balance"]["split"] == best["split"]


@pytest.mark.slow
def test_trials_measure_the_pick_and_the_predictions(tmp_path):
    """CPU, 4 gloo processes: every feasible 1F1B/ddp candidate run as a real job; the pick made
    without trials measures within 10% of the best, the top five predictions within 20%."""
    out = tmp_path / "plan"
    argv = "--plan --trials 99 --steps 20 --model delay --flavor uneven-wide --gpus 4 --device-memory 700K "
    argv += f"--schedule 1f1b --dp-mode ddp --out {out}"
    assert main(argv.split()) == 0
    plan = json.loads((out / "plan.json").read_text())
    measured = [e for e in plan["candidates"] if e.get("measured_step_s")]
    assert len(measured) == sum(e["fits"] for e in plan["candidates"])
    best = min(e["measured_step_s"] for e in measured)
    pick = next(e for e in measured if e["name"] == plan["predicted_best"]["name"])
    assert pick["measured_step_s"] <= 1.1 * best
    top5 = sorted(measured, key=lambda e: e["predicted_step_s"])[:5]
    assert all(abs(e["prediction_error"]) <= 0.2 for e in top5), [(e["name"], e["prediction_error"]) for e in top5]
