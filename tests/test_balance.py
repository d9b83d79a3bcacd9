"""Balance by measured time: the delay model's per-sample cost, the time split, and --balance end to end."""

from __future__ import annotations

import pytest
import torch

from core.config import ConfigError
from core.models import build_model
from core.parallel.partition import balanced_split, time_split
from jobs.plan.strategies import validate_run

from harness import run_ranks
from helpers import cfg, join


def test_delay_wait_is_proportional_to_the_samples_a_block_processes(monkeypatch):
    from core.models import delay

    asked: list[float] = []
    monkeypatch.setattr(delay, "wait", lambda ms, device: asked.append(ms))
    m = build_model("delay", "uneven")
    f = m.flavor
    for n in (2, 8):
        asked.clear()
        m(torch.randn(n, f.width, requires_grad=True)).sum().backward()
        forward, backward = asked[: f.blocks], asked[f.blocks :][::-1]  # backward runs last block first
        per_sample = [f.ms_per_sample * f.cost(i) * n for i in range(f.blocks)]
        assert forward == pytest.approx([w + f.call_overhead_ms for w in per_sample])
        assert backward == pytest.approx([2 * w + f.call_overhead_ms for w in per_sample])


def test_delay_block_really_waits_its_per_sample_cost():
    import time

    m = build_model("delay", "tiny")
    x = torch.randn(8, m.flavor.width)
    t0 = time.perf_counter()
    m.blocks["d0"](x)
    # a sleep is a lower bound: 8 samples wait at least 8 x ms_per_sample (no upper bound: shared machine)
    assert time.perf_counter() - t0 >= 8 * m.flavor.ms_per_sample / 1000


def test_time_split_keeps_every_stage_within_memory_and_refuses_when_nothing_fits():
    times = [1.0, 1.0, 1.0, 1.0, 1.0, 5.0]
    assert time_split(times, 2) == [5, 1]
    # stage bytes = blocks held: at most 3 blocks per stage forces 3,3 despite the slow last block
    assert time_split(times, 2, lambda s, i, j: j - i, capacity=3) == [3, 3]
    with pytest.raises(ValueError, match="fits"):
        time_split(times, 2, lambda s, i, j: j - i, capacity=2)


class PlanOnRanks:
    """plan_for_run on a real gloo group of 4 pipeline ranks: rank 0 profiles, every rank gets its plan."""

    def __call__(self) -> dict:
        from core.data import synthetic_vectors
        from core.parallel import distributed
        from core.parallel.balance import plan_for_run

        c = cfg(strategy="pp", gpus=4, model="delay", flavor="uneven", microbatches=8, batch_size=16)
        state = join(c)
        try:
            torch.manual_seed(0)
            model = build_model("delay", "uneven")
            data = synthetic_vectors(32, model.flavor.width, 0)
            plan = plan_for_run(model, c, state, data.x, data.y)
            stage_s = lambda split: max(plan.stage_time_s(split))
            return {
                "split": plan.split,
                "params_split": plan.params_split,
                "max_stage_time": stage_s(plan.split),
                "max_stage_params": stage_s(plan.params_split),
                "step_time": plan.predicted()["step_time_s"],
                "step_params": plan.predicted(plan.params_split)["step_time_s"],
                "samples": plan.microbatch_samples,
                "grads": [p.grad for p in model.parameters()],
            }
        finally:
            distributed.shutdown()


def test_time_split_beats_the_params_split_on_the_uneven_flavor_and_every_rank_agrees():
    results = run_ranks(PlanOnRanks(), 4)
    r = results[0]
    assert all(o["split"] == r["split"] for o in results)  # one plan, broadcast from rank 0
    assert r["samples"] == 2  # one micro-batch of the run's shape: 16 / 8
    assert r["params_split"] == balanced_split([16] * 8, 4) == [2, 2, 2, 2]
    assert r["split"] != r["params_split"]
    assert r["max_stage_time"] < r["max_stage_params"]
    assert r["step_time"] < r["step_params"]
    assert all(g is None for g in r["grads"])  # profiling leaves no gradients behind


class TrainUneven:
    def __init__(self, balance: str | None, folder: str) -> None:
        self.balance, self.folder = balance, folder

    def __call__(self) -> dict:
        from helpers import train_in_rank

        c = cfg(strategy="pp", gpus=2, model="delay", flavor="uneven", steps=3, microbatches=4, balance=self.balance)
        return train_in_rank(c, out_dir=self.folder)


@pytest.mark.parametrize("balance", ["params", None])
def test_balance_flag_reaches_result_json_with_predicted_and_measured_stage_times(balance, tmp_path):
    import json

    run_ranks(TrainUneven(balance, str(tmp_path)), 2)
    r = json.loads((tmp_path / "result.json").read_text())
    b = r["balance"]
    assert r["config"]["balance"] == balance
    assert b["balance"] == (balance or "time")  # time is the default where nothing else is asked
    # uneven on 2 stages: params gives 4,4 (costs 3.5 and 5.5); time moves a block to the first stage
    assert b["split"] == ([4, 4] if balance == "params" else [5, 3])
    assert [len(s) for s in r["stages"]] == b["split"]  # the pipeline cut where the plan says
    assert len(b["predicted"]["stage_busy_time_s"]) == len(b["measured"]["stage_busy_time_s"]) == 2
    assert 0 <= b["predicted"]["bubble_fraction"] < 1 and b["measured"]["bubble_fraction"] is not None


@pytest.mark.parametrize("gpus,batch,microbatches", [(2, 16, None), (4, 16, None), (3, 12, None), (4, 16, 8)])
def test_plan_counts_microbatches_and_places_stages_as_the_pipeline_does(gpus, batch, microbatches):
    from core.parallel.balance import pipeline_microbatches, stage_owners
    from core.parallel.distributed import DistState
    from core.parallel.layout import Layout
    from pp.pipeline import resolved_microbatches
    from pp.schedules import SCHEDULES, stage_owner

    for schedule in SCHEDULES:
        c = cfg(strategy="pp", gpus=gpus, model="delay", schedule=schedule, batch_size=batch, microbatches=microbatches)
        state = DistState(Layout.from_config(c))
        assert pipeline_microbatches(c, state) == resolved_microbatches(c, state.layout), schedule
        owners = [stage_owner(schedule, s, gpus) for s in range(state.layout.stages)]
        assert stage_owners(c, state) == owners, schedule


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(strategy="pp", gpus=2, split=[4, 4], balance="time", model="delay"), "both choose the cut"),
        (dict(strategy="tp", gpus=2, balance="time", model="gpt"), "--balance applies to --strategy mp or pp"),
        (dict(strategy="mp", gpus=2, balance="flops"), "unknown --balance 'flops'"),
    ],
)
def test_bad_balance_is_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        validate_run(cfg(**kw))
