"""Bring your own model: a model file outside the project, by import path, under every style; the
pipeline contract's refusals (one line, exit 2, nothing started); --check sees the optimizer."""

from __future__ import annotations

import json
import os
import shutil
import textwrap

import pytest

from harness import run_ranks
from helpers import cfg, join, one_process, run_submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "my_model.py")
MODEL = "user_model:build"


@pytest.fixture
def outside(tmp_path) -> str:
    """A folder outside the project holding the example model file under another name."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / "user_model.py")
    return str(folder)


def env_with(folder: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([folder, os.environ.get("PYTHONPATH", "")]))


def assert_green(check: dict, case) -> None:
    # fp32, TF32 off: only the summation order differs (micro-batches, split matmuls): ~1e-6
    # measured, 1e-5 allowed; updates within the check's own parameter tolerance (core.check.reference)
    assert check["passed"], (case, check)
    assert check["max_grad_rel_diff"] < 1e-5 and check["max_loss_abs_diff"] < 1e-5, (case, check)
    assert check["max_param_rel_diff"] <= check["param_tolerance"], (case, check)


def test_own_model_file_runs_check_green_from_the_command_line(outside, tmp_path):
    # split 2,3: the seam falls where the next block transposes its input, so the gradient sent
    # back is a transposed view (made contiguous); the loss's temperature lives on the last stage
    out = tmp_path / "run"
    p = run_submit(
        *("--strategy", "pp", "--gpus", "2", "--model", MODEL, "--schedule", "gpipe", "--split", "2,3"),
        *("--check", "--steps", "3", "--out", out),
        cwd=tmp_path,
        env=env_with(outside),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads((out / "result.json").read_text())
    assert r["model"] == MODEL and r["stages"] == [["embed", "mix"], ["branch", "ffn", "head"]]
    assert_green(r["check"], "pp gpipe")
    assert "my_model's vectors" in r["data_source"]  # the model's own synthetic data


class OwnModelMatrix:
    """On 2 gloo ranks: pp 1f1b and interleaved (tuples and transposed views across seams), tp with
    the model's own plan, dp; each run once with the model's optimizer and once with the style's
    optimizer at 10x the learning rate (the reference keeps the right one)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __call__(self) -> dict:
        import sys

        import torch

        sys.path.insert(0, self.folder)
        from core.parallel import distributed
        from core.training.train import run
        from jobs.plan.strategies import get_build

        cases = {
            "pp 1f1b": dict(strategy="pp", schedule="1f1b", split=[3, 2]),
            "pp interleaved": dict(strategy="pp", schedule="interleaved-1f1b", split=[1, 1, 1, 2]),
            "tp": dict(strategy="tp"),
            "dp": dict(strategy="dp"),
        }
        out = {}
        try:
            for name, kw in cases.items():
                c = cfg(gpus=2, model=MODEL, check=True, steps=3, **kw)
                out[name] = run(c, join(c), get_build(c.strategy))["check"]
                c1 = cfg(gpus=2, model=MODEL, check=True, steps=1, **kw)
                wrong = lambda params, c1=c1: torch.optim.SGD(params, lr=10 * c1.resolved_lr, foreach=False)
                out[name + " 10x lr"] = run(c1, join(c1), get_build(c1.strategy), style_optimizer=wrong)["check"]
        finally:
            distributed.shutdown()
        return out


def test_own_model_runs_check_green_under_pp_tp_dp_and_a_wrong_learning_rate_fails(outside):
    results = run_ranks(OwnModelMatrix(outside), 2, timeout_s=600)
    for case, check in results[0].items():
        if case.endswith("10x lr"):
            # gradients agree (the step has not happened yet), the updates are 9x apart
            assert not check["passed"], (case, check)
            assert check["max_grad_rel_diff"] < 1e-5 and check["max_param_rel_diff"] > 5, (case, check)
        else:
            assert_green(check, case)
        # every rank reports the same worst differences, and names the parameter they were seen on
        assert results[1][case] == check, case


def test_own_model_under_mp_and_a_wrong_learning_rate_fails(outside, monkeypatch):
    import torch

    from core.training.train import run
    from mp import build

    monkeypatch.syspath_prepend(outside)
    c = cfg(strategy="mp", gpus=3, model=MODEL, check=True, steps=3)
    r = run(c, one_process(c), build)
    # one process, the same operations in the same order: exactly equal, loss parameter included
    assert r["check"]["passed"] and r["check"]["max_grad_rel_diff"] == 0.0, r["check"]
    c1 = cfg(strategy="mp", gpus=3, model=MODEL, check=True, steps=1)
    wrong = lambda params: torch.optim.SGD(params, lr=10 * c1.resolved_lr)
    bad = run(c1, one_process(c1), build, style_optimizer=wrong)["check"]
    assert not bad["passed"] and bad["max_param_rel_diff"] > 5, bad


# ---- the contract's refusals: one line on stderr, exit 2, before anything starts ----------------
TIED = """
    import torch
    from torch import nn
    from core.models import BlockModel

    class Tied(BlockModel):
        def __init__(self):
            super().__init__()
            embed = nn.Embedding(16, 8)
            head = nn.Linear(8, 16, bias=False)
            head.weight = embed.weight  # one tensor, used by the first and the last block
            self.blocks["embed"], self.blocks["mid"], self.blocks["head"] = embed, nn.Linear(8, 8), head

        def loss(self, out, y):
            return nn.functional.cross_entropy(out, y)

    class OwnForward(Tied):
        def __init__(self):
            super().__init__()
            self.blocks["head"] = nn.Linear(8, 16)

        def forward(self, x):  # work outside the blocks: a pipeline stage would never run it
            return super().forward(x) * 2

    def tied(flavor):
        return Tied()

    def own_forward(flavor):
        return OwnForward()

    def not_a_block_model(flavor):
        return nn.Linear(2, 2)
"""

REFUSED = {
    "tied weights across pp stages": (
        ["--strategy", "pp", "--gpus", "2", "--model", "contract_models:tied"],
        "are one tied weight",
    ),
    "tied weights across mp stages": (
        ["--strategy", "mp", "--gpus", "2", "--model", "contract_models:tied", "--split", "1,2"],
        "blocks embed, head on different stages",
    ),
    "pp with a forward of its own": (
        ["--strategy", "pp", "--gpus", "2", "--model", "contract_models:own_forward"],
        "overrides forward()",
    ),
    "tp without a plan (built-in)": (
        ["--strategy", "tp", "--gpus", "2", "--model", "delay"],
        "no tensor-parallel plan",
    ),
    "tp without a plan (user model)": (
        ["--strategy", "tp", "--gpus", "2", "--model", "contract_models:tied"],
        "no tensor-parallel plan",
    ),
    "dualpipev with fewer micro-batches than stages": (
        ["--strategy", "pp", "--gpus", "2", "--model", "gpt", "--schedule", "dualpipev", "--microbatches", "2"],
        "at least as many micro-batches as stages (4; got 2)",
    ),
    "interleaved micro-batches not a multiple of the rounds": (
        ["--strategy", "pp", "--gpus", "2", "--model", "gpt", "--batch-size", "10", "--microbatches", "5"]
        + ["--schedule", "interleaved-1f1b"],
        "multiple of the rounds (2)",
    ),
    "model module not importable": (["--model", "no_such_module:build"], "cannot import no_such_module"),
    "factory returns another kind of module": (
        ["--model", "contract_models:not_a_block_model"],
        "not a core.models.BlockModel",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_the_contract_cannot_do_is_refused_in_one_line(case, tmp_path):
    (tmp_path / "contract_models.py").write_text(textwrap.dedent(TIED))
    args, msg = REFUSED[case]
    p = run_submit(*args, "--out", tmp_path / "run", cwd=tmp_path, env=env_with(str(tmp_path)), timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert msg in lines[0], lines[0]
    assert not (tmp_path / "run").exists()  # nothing started


def test_tied_weights_in_one_stage_are_accepted_and_stay_tied(tmp_path, monkeypatch):
    from core.models import build_model
    from jobs.plan.strategies import validate_run

    (tmp_path / "contract_models.py").write_text(textwrap.dedent(TIED))
    monkeypatch.syspath_prepend(str(tmp_path))
    # a tie inside one stage is one tensor in one module: nothing to refuse
    validate_run(cfg(strategy="mp", gpus=1, model="contract_models:tied"))
    validate_run(cfg(strategy="dp", gpus=2, model="contract_models:tied"))
    model = build_model("contract_models:tied")
    stage = model.keep_only(["embed", "mid", "head"])
    assert stage.blocks.embed.weight is stage.blocks.head.weight  # copied together: still one tensor
