"""Stop on SIGUSR2, checkpoint, resume: the resumed run's losses equal an uninterrupted run's exactly."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from core.checkpoint import StopRequest
from core.train import Preempted, run
from jobs.strategies import get_build

from helpers import cfg, one_process, small_mnist


def test_sigusr2_checkpoint_and_resume_is_bit_for_bit(tmp_path):
    data = small_mnist(2048, 64)
    # dropout ON: the RNG state must be restored too, or the masks (and losses) would differ
    c = cfg(strategy="mp", gpus=3, steps=40, batch_size=32)
    straight = run(c, one_process(c), get_build("mp"), dataset=data)

    stop = StopRequest()
    stop.install()
    timer = threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGUSR2))  # a real signal, mid-run
    timer.start()
    with pytest.raises(Preempted):
        run(c, one_process(c), get_build("mp"), out_dir=str(tmp_path), dataset=data, stop=stop)
    timer.cancel()
    assert (tmp_path / "checkpoint" / "latest.json").exists()
    assert not (tmp_path / "result.json").exists()
    resumed = run(c, one_process(c), get_build("mp"), out_dir=str(tmp_path), dataset=data, stop=StopRequest())
    assert resumed["losses"] == straight["losses"]  # exact, not approximately
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
