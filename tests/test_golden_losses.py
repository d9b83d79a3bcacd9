"""Golden losses: the first losses of tiny deterministic runs, so a change that silently alters the
math (init, data order, loss scaling, optimizer) is caught. Regenerate deliberately with
UPDATE_GOLDEN=1 and say why in the commit."""

from __future__ import annotations

import json
import os

import pytest

from core.training.train import run
from jobs.plan.strategies import get_build

from helpers import cfg, one_process, small_mnist

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "losses.json")
CASES = {
    "mnist-cnn reference": dict(strategy="reference", model="mnist-cnn", batch_size=32),
    "gpt tiny reference": dict(strategy="reference", model="gpt", batch_size=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_losses_match_the_golden_file(case):
    data = small_mnist(512, 32) if CASES[case]["model"] == "mnist-cnn" else None
    c = cfg(steps=6, **CASES[case])
    r = run(c, one_process(c), get_build("reference"), dataset=data)
    golden = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    if os.environ.get("UPDATE_GOLDEN"):
        golden[case] = r["losses"]
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1)
    # CPU kernels may sum in another order on another processor: 1e-5 relative, not bit equality
    assert r["losses"] == pytest.approx(golden[case], rel=1e-5)
