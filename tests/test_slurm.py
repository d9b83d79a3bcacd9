"""Against a real Slurm (slurmctld + slurmd + munged, started here): jobs of every style, and
every failure a user meets, each answered in one line and in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import slurm_cluster
from helpers import run_submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMIT = os.path.join(ROOT, "jobs", "submit.py")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(not slurm_cluster.available(), reason=slurm_cluster.MISSING_REASON),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def submit(slurm, tmp_path, *args, timeout=300):
    return run_submit("--cluster", "slurm", *args, cwd=tmp_path, timeout=timeout, env=slurm.environ())


def test_mp_job_on_slurm_requests_gpus_and_passes_the_check(slurm, tmp_path):
    out = tmp_path / "mp"
    p = submit(slurm, tmp_path, "--strategy", "mp", "--gpus", "2", "--steps", "3", "--check", "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["check"]["passed"] and r["steps"] == 3 and r["eval_accuracy"] is not None
    script = next((out / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "--kill-on-bad-exit=1" in script


@pytest.mark.parametrize("strategy,extra", [("pp", ["--model", "delay"]), ("tp", ["--model", "gpt", "--check"])])
def test_multi_task_jobs_on_slurm(slurm, tmp_path, strategy, extra):
    out = tmp_path / strategy
    p = submit(slurm, tmp_path, "--strategy", strategy, "--gpus", "2", "--steps", "2", *extra, "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["world_size"] == 2 and len(r["losses"]) == 2
    if strategy == "pp":
        assert (out / "timeline.png").exists() and r["bubble_fraction"] is not None
    else:
        assert r["check"]["passed"] and r["communication_first_step"]["per_layer"]["forward"] == {"all_reduce": 2}
    script = next((out / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script


REJECTIONS = {
    "more gpus than exist": (["--gpus", "5", "--model", "gpt"], "node configuration is not available"),
    "unknown partition": (["--partition", "nope"], "invalid partition"),
    "time over the limit": (["--time", "300"], "time limit"),
    "more memory than exists": (["--mem", "900G"], "memory specification can not be satisfied"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_sbatch_rejection_is_one_line_with_sbatchs_reason(slurm, tmp_path, case):
    args, reason = REJECTIONS[case]
    out = tmp_path / "run"
    p = submit(slurm, tmp_path, "--strategy", "mp", "--steps", "1", *args, "--out", str(out), timeout=60)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert "sbatch refused the job" in err[0] and reason.lower() in err[0].lower(), err[0]
    assert not out.exists()  # nothing left behind
    print(f"{case}: {p.seconds:.1f} s: {err[0]}")


def test_failing_ranks_are_reported_with_their_own_exception(slurm, tmp_path):
    # a rank that raises in the job (the test-only injected fault: what the submitting host can see,
    # such as a batch larger than the training split, is refused before anything is queued)
    p = run_submit(
        "--cluster",
        "slurm",
        "--strategy",
        "pp",
        "--gpus",
        "2",
        "--model",
        "delay",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
        timeout=300,
        env={**slurm.environ(), "MPS_FAULT": "crash:rank=1:step=1"},
    )
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert "InjectedFaultError" in err[0] and "rank 1" in err[0], err[0]
    print(f"failing rank: {p.seconds:.1f} s: {err[0]}")


def test_a_job_that_dies_before_python_fails_instead_of_waiting_forever(slurm, tmp_path):
    """No accounting daemon here: submitit alone would wait forever. The image 'runs' under an
    apptainer that this host does not have, so the task dies before Python writes a result."""
    sif = tmp_path / "missing-runtime.sif"
    sif.write_text("not an image")
    p = submit(
        slurm,
        tmp_path,
        "--strategy",
        "mp",
        "--steps",
        "1",
        "--container",
        str(sif),
        "--out",
        str(tmp_path / "run"),
        timeout=180,
    )
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1, p.stderr
    assert "no result was written" in err[0] and "apptainer" in err[0].lower(), err[0]
    print(f"died before python: {p.seconds:.1f} s: {err[0]}")


def test_auto_picks_slurm_when_sinfo_answers(slurm, tmp_path):
    p = run_submit("--dry-run", "--out", tmp_path / "r", cwd=tmp_path, timeout=60, env=slurm.environ())
    assert p.returncode == 0 and "would submit to slurm" in p.stdout and "#SBATCH" in p.stdout


@pytest.mark.parametrize("strategy,extra", [("mp", ["--gpus", "3"]), ("pp", ["--gpus", "2", "--model", "gpt"])])
def test_usr2_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path, strategy, extra):
    """scancel --signal=USR2 (what a preemption or the time limit sends): the job checkpoints,
    requeues itself, resumes, and ends with exactly the losses of an uninterrupted run."""
    import re

    common = ["--strategy", strategy, *extra, "--steps", "120", "--batch-size", "16", "--log-every", "5"]
    straight = tmp_path / "straight"
    p = run_submit("--cluster", "local", *common, "--out", straight, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]

    out = tmp_path / "preempted"
    proc = subprocess.Popen(
        [sys.executable, SUBMIT, "--cluster", "slurm", *common, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=slurm.environ(),
        cwd=tmp_path,
    )
    job_id, deadline = None, time.time() + 120
    while time.time() < deadline:  # wait until the job is training, then signal it
        logs = list((out / "submitit").glob("*_0_log.out")) if (out / "submitit").exists() else []
        if logs and "step 10/" in logs[0].read_text():
            job_id = logs[0].name.split("_")[0]
            break
        time.sleep(0.5)
    assert job_id, "job never started training"
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm.environ(), check=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(r"resumed from .* at step \d+", stdout), stdout[-3000:]
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert len(b["losses"]) == 120 and b["losses"] == a["losses"]  # bit for bit on CPU


def test_a_crash_after_a_checkpoint_is_requeued_and_resumes_exactly(slurm, tmp_path):
    """Rank 1 crashes after step 5 of the first attempt (MPS_FAULT, test-only): the job requeues
    itself, resumes from the step-4 checkpoint and ends with an uninterrupted run's losses; the
    summary says it took 2 attempts. With --max-retries 0 the same crash fails the job, naming rank 1."""
    common = ["--strategy", "pp", "--gpus", "2", "--model", "gpt", "--steps", "10", "--batch-size", "16"]
    straight = tmp_path / "straight"
    p = run_submit("--cluster", "local", *common, "--out", straight, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]

    env = dict(slurm.environ(), MPS_FAULT="crash:rank=1:step=5")
    out = tmp_path / "crashed"
    p = run_submit("--cluster", "slurm", *common, "--checkpoint-every", "4", "--out", out, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "attempts: 2" in p.stdout
    # the requeue is told with the error that caused it and the attempt; the crash is no hang
    said = "requeued after attempt 1: rank 1 failed (InjectedFaultError: MPS_FAULT: rank 1 crashed after step 5"
    assert said in p.stdout and "attempt 2 of at most 3" in p.stdout, p.stdout[-3000:]
    assert "no progress" not in p.stdout
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert b["attempts"] == 2 and b["losses"] == a["losses"]  # bit for bit on CPU

    out = tmp_path / "no-retry"
    args = [*common, "--checkpoint-every", "4", "--max-retries", "0", "--out", out]
    p = run_submit("--cluster", "slurm", *args, cwd=tmp_path, env=env)
    assert p.returncode == 1 and "rank 1: core.training.faults.InjectedFaultError" in p.stderr, p.stderr[-2000:]
