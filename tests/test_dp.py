"""Data parallelism composed with every style, on gloo: parity with the single-device reference.

Each replica trains on its shard of the same global batch; the reference sees the whole batch, so
the check compares the global batch's loss and gradients. fp32, TF32 off: replicas change only the
summation order (a mean over two halves, then an average across replicas), a few ulps: 1e-5.
"""

from __future__ import annotations

import pytest

from harness import run_ranks
from helpers import cfg, small_mnist, train_in_rank

CASES = {
    # name: (ranks, configuration)
    "dp 2 (ddp, the default)": (2, dict(strategy="dp", gpus=2, model="gpt")),
    "dp 2 (fsdp)": (2, dict(strategy="dp", gpus=2, model="gpt", dp_mode="fsdp")),
    "dp 2 mnist-cnn": (2, dict(strategy="dp", gpus=2, model="mnist-cnn", batch_size=32)),
    "mp 4 = dp 2 x 2 stages": (2, dict(strategy="mp", gpus=4, dp=2, model="mnist-cnn", batch_size=32)),
    "pp 4 = dp 2 x pp 2 (ddp)": (4, dict(strategy="pp", gpus=4, dp=2, model="gpt", batch_size=8)),
    # two forwards before the first backward on a stage (1F1B's first stage with m = p; GPipe's
    # every stage): DDP's bucket rebuild failed inside torch at the second step
    "pp 4 = dp 2 x pp 2 (ddp) 1f1b m = p": (
        4,
        dict(strategy="pp", gpus=4, dp=2, model="gpt", batch_size=8, schedule="1f1b", microbatches=2),
    ),
    "pp 4 = dp 2 x pp 2 (ddp) gpipe": (
        4,
        dict(strategy="pp", gpus=4, dp=2, model="gpt", batch_size=8, schedule="gpipe"),
    ),
    "pp 4 = dp 2 x pp 2 (fsdp)": (4, dict(strategy="pp", gpus=4, dp=2, model="gpt", batch_size=8, dp_mode="fsdp")),
    "tp 4 = dp 2 x tp 2": (4, dict(strategy="tp", gpus=4, dp=2, tp=2, model="gpt")),
    # 3D: 8 gloo ranks on 2 cores, about 1.5 minutes; the one many-rank case of the default run
    "pp 8 = dp 2 x pp 2 x tp 2 (3D)": (8, dict(strategy="pp", gpus=8, dp=2, tp=2, model="gpt", batch_size=8)),
}


class Train:
    def __init__(self, kw: dict) -> None:
        self.kw = kw

    def __call__(self) -> dict:
        c = cfg(steps=3, check=True, **self.kw)
        data = small_mnist(256, 64) if c.model == "mnist-cnn" else None
        r = train_in_rank(c, dataset=data)
        keys = ("check", "losses", "layout", "communication_per_axis", "eval_accuracy", "replica_batch", "config")
        return {k: r[k] for k in keys}


def check_case(world: int, kw: dict) -> list[dict]:
    results = run_ranks(Train(kw), world, timeout_s=900)
    first = results[0]
    c = first["check"]
    # fp32, TF32 off: a different summation order only (see the module docstring)
    assert c["passed"] and c["max_grad_rel_diff"] < 1e-5 and c["max_loss_abs_diff"] < 1e-5, (kw, c)
    assert c["steps_compared"] == 3
    for other in results[1:]:
        assert other["losses"] == first["losses"]  # every rank reports the same global loss
    layout = first["layout"]
    # each replica trained on its own shard of the global batch, not on the whole batch
    assert first["replica_batch"] * layout["dp"] == first["config"]["batch_size"]
    assert layout["dp"] == kw.get("dp", kw["gpus"] if kw["strategy"] == "dp" else 1)
    assert layout["processes"] == world and layout["devices"] == kw["gpus"]
    dp = first["communication_per_axis"]["dp"]
    assert dp["mode"] == layout["dp_mode"]
    assert (dp.get("all_reduce_bytes") or dp.get("reduce_scatter_bytes")) > 0
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_matches_the_reference(case):
    world, kw = CASES[case]
    check_case(world, kw)


def test_data_parallel_eval_scores_every_held_out_sample_once():
    """Replicas score different rows: the accuracy of dp 2 equals the single process's."""
    kw = dict(strategy="dp", gpus=2, model="mnist-cnn", batch_size=32)
    dp = run_ranks(Train(kw), 2, timeout_s=600)[0]
    one = run_ranks(Train(dict(kw, strategy="reference", gpus=1)), 1, timeout_s=600)[0]
    assert dp["eval_accuracy"] is not None
    # same weights up to rounding after 3 steps: the same digits right (64 of them, 1/64 apart)
    assert abs(dp["eval_accuracy"] - one["eval_accuracy"]) < 1 / 64


@pytest.mark.parametrize("strategy,gpus,dp,tp", [("dp", 4, 4, 1), ("mp", 6, 2, 1), ("pp", 8, 2, 2), ("tp", 4, 2, 2)])
def test_replica_shards_cover_the_global_batch_once(strategy, gpus, dp, tp):
    from core.parallel.layout import Layout

    layout = Layout.from_config(cfg(strategy=strategy, gpus=gpus, dp=dp, tp=tp, model="gpt"))
    rows = [r for rank in range(layout.processes) for r in range(24)[layout.shard(rank, 24)]]
    # every rank of a replica (its pipeline and tensor ranks) takes the same rows; replicas disjoint
    assert sorted(set(rows)) == list(range(24))
    assert len(rows) == 24 * layout.processes // layout.dp


def test_default_dp_mode_is_ddp_and_fsdp_where_tensor_parallel_needs_it():
    from core.parallel.layout import Layout

    assert Layout.from_config(cfg(strategy="dp", gpus=2)).dp_mode == "ddp"  # measured faster (README)
    assert Layout.from_config(cfg(strategy="mp", gpus=4, dp=2)).dp_mode == "ddp"
    assert Layout.from_config(cfg(strategy="tp", gpus=4, dp=2, model="gpt")).dp_mode == "fsdp"  # DTensor params
    assert Layout.from_config(cfg(strategy="pp", gpus=8, dp=2, tp=2, model="gpt")).dp_mode == "fsdp"
