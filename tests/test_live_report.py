"""What a person watches while a run goes: progress lines with the time left, at least every 30 s;
a run without the tensorboard package says so in one note and goes on."""

from __future__ import annotations

import sys

import torch

from core.report import live
from core.report.curves import Scalars


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_slow_steps_still_print_every_30_seconds_with_the_time_left(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(live.time, "perf_counter", clock)
    lines: list[str] = []
    report = live.LiveReport(lines.append, Scalars(None, False), 100, 0, 32, None, log_every=50)
    for step in range(1, 11):
        clock.t += 12.0  # 12 s a step: --log-every 50 alone would stay silent for 10 minutes
        report.step_done(step, 0, torch.tensor(2.0 - step / 10))
    printed = [int(line.split()[1].split("/")[0]) for line in lines]
    assert printed == [1, 4, 7, 10]  # the first step, then every 3 steps: >= 30 s apart
    assert lines[-1].endswith("12000 ms/step  18m00s left"), lines[-1]  # 90 steps x 12 s
    assert "left" not in lines[0]  # the first step alone pays for warm-up: no forecast from it
    assert "loss 1.0000" in lines[-1] and "2.7 samples/s" in lines[-1]


def test_language_models_report_tokens_per_second(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(live.time, "perf_counter", clock)
    lines: list[str] = []
    report = live.LiveReport(lines.append, Scalars(None, False), 4, 0, 8, 128, log_every=2)
    for step in range(1, 3):
        clock.t += 0.5
        report.step_done(step, 0, torch.tensor(5.0))
    assert "16.0 samples/s  2,048 tokens/s" in lines[-1]


def test_without_tensorboard_one_note_and_no_event_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were missing
    scalars = Scalars(str(tmp_path), True)
    scalars.add("train/loss", 1.0, 1)
    scalars.finish({"steps": 1})
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("note: tensorboard is not installed"), out
    assert not (tmp_path / "tensorboard").exists()
