"""The watcher against a real Slurm: a controller outage is not a failed job, a pending
job says why (a drained node, named), the rank killed by pid is the one blamed, and
``--cluster auto`` with a silent controller is an error, not a run on the login node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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


def signal_rank_1_after_step_1(slurm, tmp_path, sig: int, *args: str) -> tuple[subprocess.Popen, str, str, float]:
    """Submit a pp 2 job into ``tmp_path/run``, send rank 1 ``sig`` by pid once rank 0 logged step 1,
    and wait for the command's end: (the process, its stdout, its stderr, when the signal went)."""
    out = tmp_path / "run"
    p = start_submit(*PP, *args, "--out", out, cwd=tmp_path, env=slurm.environ())
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        sent = time.time()
        os.kill(rank_pid(1, str(out)), sig)
        stdout, stderr = p.communicate(timeout=200)
    finally:
        p.kill()
    return p, stdout, stderr, sent


def test_the_rank_killed_under_slurm_is_the_one_named(slurm, tmp_path):
    p, stdout, stderr, _ = signal_rank_1_after_step_1(
        slurm, tmp_path, signal.SIGKILL, "--steps", "100000", "--dist-timeout", "20"
    )
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "rank 1 was killed by SIGKILL; no reason was recorded" in line, line  # srun's "Killed", named


def test_a_rank_a_signal_kills_under_slurm_is_named_with_the_signal(slurm, tmp_path):
    """Rank 1 signals itself with SIGSEGV after step 2 (MPS_FAULT kill, tests only): srun's words for
    it ("Segmentation fault") give the signal by name; no reason was recorded, and it is no stall."""
    env = {**slurm.environ(), "MPS_FAULT": "kill:rank=1:step=2:signal=SEGV"}
    p = run_submit(*PP, "--steps", "50", "--max-retries", "0", "--out", tmp_path / "run", cwd=tmp_path, env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert "rank 1 was killed by SIGSEGV; no reason was recorded" in line, line
    assert "stopped making progress" not in p.stdout + p.stderr and "no progress" not in p.stdout
    print(f"SIGSEGV under Slurm: {p.seconds:.1f} s: {line}")


def test_a_rank_stopped_under_slurm_stays_named_after_slurms_sigcont(slurm, tmp_path):
    """SIGSTOP of rank 1 by pid: rank 0's watchdog reports, rank 1 cannot; the table names rank 1.
    When rank 0 times out, Slurm ends the step with SIGCONT and SIGTERM: rank 1 wakes and writes a
    fresh report, and the verdict still names rank 1, not the peer whose timeout ended the job."""
    out = tmp_path / "run"
    args = ("--steps", "100000", "--dist-timeout", "20", "--hang-timeout", "4", "--max-retries", "0")
    t0 = time.time()
    p, stdout, stderr, stopped = signal_rank_1_after_step_1(slurm, tmp_path, signal.SIGSTOP, *args)
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: job") and "rank 1 wrote no report (stopped or killed)" in line, line
    assert "no progress: what each rank is doing" in stdout
    woken = json.loads((out / "hang" / "rank-1.json").read_text())  # written after the SIGCONT
    assert woken["reported_at"] > stopped + 4, woken
    print(f"SIGSTOP under Slurm: {time.time() - t0:.1f} s: {line}")


def test_scancel_of_a_running_job_is_told_as_cancelled(slurm, tmp_path):
    """scancel sends the ranks SIGTERM: they stop at a step boundary and write their error results.
    The job is said to have been cancelled, not to have failed; exit 1."""
    out = tmp_path / "run"
    t0 = time.time()
    p = start_submit(*PP, "--steps", "100000", "--out", out, cwd=tmp_path, env=slurm.environ())
    try:
        log = rank0_log(str(out))
        wait_for_text(log, "step 1/")
        job_id = os.path.basename(log).split("_")[0]
        subprocess.run(["scancel", job_id], env=slurm.environ(), check=True, timeout=30)
        stdout, stderr = p.communicate(timeout=200)
    finally:
        p.kill()
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: job {job_id} was cancelled"), line
    assert "failed" not in line.split(":")[1], line
    print(f"scancel: {time.time() - t0:.1f} s: {line}")
