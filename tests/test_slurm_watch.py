"""The watcher against a real Slurm: a controller outage is not a failed job, a pending
job says why (a drained node, named), the rank killed by pid is the one blamed, and
``--cluster auto`` with a silent controller is an error, not a run on the login node."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from procs import rank0_log, rank_pid, start_submit, wait_for_text

import slurm_cluster
from helpers import run_submit

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(not slurm_cluster.available(), reason=slurm_cluster.MISSING_REASON),
]
PP = ("--cluster", "slurm", "--strategy", "pp", "--gpus", "2", "--model", "delay", "--device", "cpu")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(str(tmp_path_factory.mktemp("slurm-watch"))).start()
    yield cluster
    cluster.stop()


def test_a_controller_outage_is_waited_out_not_reported_as_a_failure(slurm, tmp_path):
    out = tmp_path / "run"
    p = start_submit(*PP, "--steps", "300", "--out", out, cwd=tmp_path, env=slurm.environ())
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        slurm.stop_controller()
        # with the controller gone, --cluster auto must not quietly run on this host instead
        auto = run_submit("--model", "delay", "--steps", "1", cwd=tmp_path, env=slurm.environ(), timeout=120)
        assert auto.returncode == 2 and "controller does not answer" in auto.stderr, auto.stderr
        assert not (tmp_path / "runs").exists()
        time.sleep(40)  # longer than the old watcher's grace: it declared the job gone by now
        slurm.start_controller()
        stdout, stderr = p.communicate(timeout=400)
    finally:
        p.kill()
        if slurm._controller() is None:
            slurm.start_controller()
    assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "controller not answering since" in stdout and "still waiting" in stdout
    assert json.loads((out / "result.json").read_text())["steps"] == 300


def test_a_pending_job_says_why_and_names_the_drained_node(slurm, tmp_path):
    slurm.scontrol("update", f"NodeName={slurm.host}", "State=DRAIN", "Reason=maintenance-test")
    out = tmp_path / "run"
    p = start_submit(*PP, "--steps", "2", "--out", out, cwd=tmp_path, env=slurm.environ())
    try:
        deadline = time.time() + 60
        seen = ""
        while "drain" not in seen.lower() and time.time() < deadline:
            seen += p.stdout.readline()
        slurm.scontrol("update", f"NodeName={slurm.host}", "State=RESUME")
        stdout, stderr = p.communicate(timeout=300)
    finally:
        p.kill()
        if "DRAIN" in slurm.scontrol("show", "node", slurm.host):
            slurm.scontrol("update", f"NodeName={slurm.host}", "State=RESUME")
    assert "pending for" in seen and f"node {slurm.host} is drained" in seen, seen
    assert "maintenance-test" in seen
    assert p.returncode == 0, seen + stdout[-2000:] + stderr[-2000:]


def test_the_rank_killed_under_slurm_is_the_one_named(slurm, tmp_path):
    out = tmp_path / "run"
    p = start_submit(*PP, "--steps", "100000", "--dist-timeout", "20", "--out", out, cwd=tmp_path, env=slurm.environ())
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        os.kill(rank_pid(1, str(out)), signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=200)
    finally:
        p.kill()
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "rank 1 stopped or was killed without an error of its own" in line, line
