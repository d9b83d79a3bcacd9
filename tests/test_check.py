"""--check itself: the update comparison's arithmetic, and README's first command as written.

The quick-start test exists because the suite's other --check tests run 2-3 steps on small
configurations and missed a drift that only showed at step 31 of the quick start: the reference
copy took the style's new weights only for the parameters its own rank held, and the rest,
following the copy's own updates, drifted by rounding until conv1's gradient on rank 0 was 1.4e-4
off (pp 3, split 1,1,4). The copy now takes every parameter each step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.check.reference import update_rel_diff

from helpers import run_submit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_update_difference_ignores_one_ulp_of_storage_and_sees_a_wrong_learning_rate():
    old = torch.full((32,), 0.2)
    grad = torch.full((32,), 1e-3)
    ref_new = old - 1e-3 * grad  # a step of 1e-6 on weights of 0.2: 1.5e-8 is one ulp there
    one_ulp_off = torch.nextafter(ref_new, torch.zeros_like(ref_new))
    assert update_rel_diff(one_ulp_off, ref_new, old) == 0.0
    # the old metric's reading of the same rounding: ~1e-2 of the update, above the 1e-3 tolerance
    assert float((one_ulp_off - ref_new).norm() / (ref_new - old).norm()) > 1e-3
    ten_x = old - 1e-2 * grad
    assert 8.5 < update_rel_diff(ten_x, ref_new, old) < 9.5
    two_ulp_off = torch.nextafter(one_ulp_off, torch.zeros_like(ref_new))
    assert update_rel_diff(two_ulp_off, ref_new, old) > 0.0  # beyond one ulp counts
    assert update_rel_diff(old, old, old) == 0.0
    assert update_rel_diff(ref_new, old, old) == float("inf")  # the reference did not move, the style did


def quick_start_command() -> list[str]:
    block = README.read_text().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    first = block.strip().splitlines()[0]
    command = first.split("&&", 1)[1].split()
    assert command[:2] == ["python", "jobs/submit.py"], first
    return command[2:]


def test_the_quick_start_command_as_written_passes_its_check(tmp_path):
    args = quick_start_command()
    assert "--check" in args
    p = run_submit(*args, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.search(r"check PASSED", p.stdout), p.stdout[-3000:]
    (result,) = tmp_path.glob("runs/*/result.json")
    r = json.loads(result.read_text())
    check = r["check"]
    assert check["passed"] and check["steps_compared"] == r["steps"] >= 31, check
    assert check["max_grad_rel_diff"] <= check["tolerance"], check
    assert check["max_param_rel_diff"] <= check["param_tolerance"], check
    # the quick start shows learning: the notebook's network, momentum 0.9, lr 0.03, two epochs
    assert r["eval_accuracy"] >= 0.90, r["eval_accuracy"]
    assert_run_is_watchable(result.parent, r, p.stdout)


def assert_run_is_watchable(folder: Path, r: dict, stdout: str) -> None:
    """Progress lines with the time left; TensorBoard event files read back by tensorboard's own
    reader; curves.png a PNG drawn from this run's steps."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert re.search(r"step \d+/\d+ .* ms/step  \d+(s|m\d\ds) left", stdout), stdout[-2000:]
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    world = r["world_size"]
    want = {"train/loss", "train/samples_per_s", "train/step_time_s", "eval/accuracy", "pipeline/bubble_measured"}
    want |= {f"memory/peak_bytes_rank{rank}" for rank in range(world)}
    assert want <= tags, tags
    losses = [e.value for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, r["steps"] + 1))
    assert losses == [float(torch.tensor(v, dtype=torch.float32)) for v in r["losses"]]
    assert events.Scalars("eval/accuracy")[-1].value == float(torch.tensor(r["eval_accuracy"], dtype=torch.float32))
    png = Image.open(folder / "curves.png")
    assert png.format == "PNG" and png.size[0] > 400
    assert png.info["Description"] == f"{r['steps']} steps, losses {r['losses'][0]:.4f} to {r['losses'][-1]:.4f}"
