"""The submit command tells the truth about a local job: the rank that went away is
named, Ctrl-C and SIGTERM stop with a checkpoint and one line, a run folder belongs to one run,
``--attach`` follows a job whose submit command is gone. Real processes, real signals."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time

import pytest
from procs import rank0_log, rank_pid, start_submit, wait_for_text

from helpers import run_submit

# a pp job of the delay model that runs until it is stopped (each step waits a few ms per sample)
LONG = ("--strategy", "pp", "--gpus", "2", "--model", "delay", "--steps", "100000", "--cluster", "local")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_the_rank_that_went_away_is_named_not_its_peer(tmp_path, how):
    """kill -9 (the OOM killer) or SIGSTOP (a hung driver) of rank 1: rank 0 only sees a reset
    connection or a timeout; the line must name rank 1."""
    out = tmp_path / "run"
    p = start_submit(*LONG, "--dist-timeout", "20", "--out", out, cwd=tmp_path)
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        victim = rank_pid(1, str(out))
        os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        stdout, stderr = p.communicate(timeout=150)
    finally:
        p.kill()
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    if how == "kill":  # the controller saw how it ended: the signal, and that the OOM killer did not send it
        said = "rank 1 was killed by SIGKILL; no reason was recorded (not by the OOM killer: its memory cgroup"
        assert said in line, line
    else:
        assert "rank 1 stopped or was killed without an error of its own" in line, line
    assert "rank 0 then saw" in line  # the peer's view is kept, as the secondary evidence
    assert not _alive(victim)  # a stopped rank is not left behind


def test_a_rank_that_signals_itself_is_named_with_the_signal_not_as_a_stall(tmp_path):
    """Rank 1 sends itself SIGSEGV after step 2 (MPS_FAULT kill, as a crash in native code would):
    the line names rank 1 and the signal, and nothing says the job stopped making progress."""
    env = dict(os.environ, MPS_FAULT="kill:rank=1:step=2:signal=SEGV")
    p = run_submit(*LONG[:7], "50", *LONG[8:], "--out", tmp_path / "run", cwd=tmp_path, env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert "failed: rank 1 was killed by SIGSEGV; no reason was recorded; rank 0 then saw" in line, line
    assert "stopped making progress" not in p.stdout + p.stderr and "no progress" not in p.stdout
    stderr_1 = next((tmp_path / "run" / "submitit").glob("*_1_log.err")).read_text()
    assert "Fatal Python error: Segmentation fault" in stderr_1  # faulthandler: its Python stack is kept
    print(f"SIGSEGV (local): {p.seconds:.1f} s: {line}")


def _memory_cgroup(limit_bytes: int):
    """A child of this process's memory cgroup (v1) limited to ``limit_bytes``, or None."""
    try:
        with open("/proc/self/cgroup") as f:
            own = next(ln.split(":", 2)[2] for ln in f.read().splitlines() if ":memory:" in ln)
        path = os.path.join("/sys/fs/cgroup/memory", own.lstrip("/"), f"mps-oom-test-{os.getpid()}")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit_bytes))
        return path
    except (OSError, StopIteration):
        return None


def test_a_rank_the_oom_killer_ends_is_told_as_the_oom_killer_with_the_kernels_words(tmp_path):
    """The whole job runs in a memory cgroup of 2.5 GB; rank 1 allocates after step 2 until the
    kernel's OOM killer ends it (MPS_FAULT oom). The line names rank 1, SIGKILL and the OOM killer,
    quoting the kernel (its log, or the cgroup's oom_kill count)."""
    import subprocess
    import sys

    cgroup = _memory_cgroup(2560 << 20)
    if cgroup is None:
        pytest.skip("needs a writable cgroup v1 memory controller (root) to limit the job's memory")
    procs = os.path.join(cgroup, "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    submit = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "submit.py")
    env = dict(os.environ, MPS_FAULT="oom:rank=1:step=2:mb=8000")
    args = [sys.executable, submit, *LONG[:7], "50", *LONG[8:], "--out", str(tmp_path / "run")]
    t0 = time.time()
    pipe = subprocess.PIPE
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=pipe, stderr=pipe, text=True, preexec_fn=enter)
    try:
        stdout, stderr = p.communicate(timeout=200)
    finally:
        p.kill()
        with open(procs) as f:
            for pid in f.read().split():
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)
        os.rmdir(cgroup)
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert "failed: rank 1 was killed by SIGKILL (the OOM killer: " in line, line
    assert "Killed process" in line or "oom_kill 0 -> 1" in line, line
    assert "no progress" not in stdout
    print(f"OOM killer (local): {time.time() - t0:.1f} s: {line}")


def test_a_rank_dead_without_a_word_ends_the_job_even_when_its_peer_cannot_notice(tmp_path):
    """NCCL's case on CPU: rank 1 is stuck where no collective times out (MPS_FAULT hang) and rank 0
    dies without writing a result (NCCL's watchdog aborts it; here kill -9). No peer fails with an
    error, so only the dead process tells: the job must end well before --dist-timeout (300 s)."""
    out = tmp_path / "run"
    env = dict(os.environ, MPS_FAULT="hang:rank=1:step=3")
    p = start_submit(*LONG, "--hang-timeout", "4", "--max-retries", "0", "--out", out, cwd=tmp_path, env=env)
    try:
        wait_for_text(str(out / "hang" / "rank-1.json"), "not responding")  # rank 1 is in the hang
        wait_for_text(str(out / "hang" / "rank-0.json"), "no progress")  # and rank 0 has said so (as on NCCL)
        victim = rank_pid(0, str(out))
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        stdout, stderr = p.communicate(timeout=120)
        ended = time.time()
    finally:
        p.kill()
    assert p.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert ended - killed < 60, ended - killed  # seconds: the watcher's poll and 5 s grace, not 300
    # the verdict follows the hang reports: rank 1 stopped first (rank 0's death came after)
    line = stderr.strip().splitlines()[-1]
    assert "rank 1 (stage 1)" in line and "stopped making progress" in line, line
    assert not _alive(rank_pid_or_none(1, str(out)))  # the hung rank is not left behind


def rank_pid_or_none(rank: int, run_dir: str) -> int:
    try:
        return rank_pid(rank, run_dir, timeout_s=1)
    except TimeoutError:
        return 2**22 + 1  # above pid_max: a pid that cannot be alive


def test_ctrl_c_checkpoints_then_stops_in_one_line_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    p = start_submit(*LONG, "--checkpoint-every", "100000", "--out", out, cwd=tmp_path)
    wait_for_text(rank0_log(str(out)), "step 1/")
    controller = json.loads((out / "run.json").read_text())["controller_pid"]
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    assert "with a checkpoint: continue with --resume" in stdout
    assert not _alive(controller)
    from core.training.checkpoint import latest_checkpoint

    step = latest_checkpoint(str(out))["position"]["step"]
    assert step >= 1
    r = run_submit("--resume", out, "--steps", step + 2, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == step + 2 and len(result["losses"]) == step + 2


def test_sigterm_to_the_submit_command_leaves_no_orphan(tmp_path):
    out = tmp_path / "run"
    p = start_submit(*LONG, "--out", out, cwd=tmp_path)
    wait_for_text(rank0_log(str(out)), "step 1/")
    ranks = [rank_pid(r, str(out)) for r in (0, 1)]
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert "SIGTERM: stopping job" in stdout
    deadline = time.time() + 15
    while any(map(_alive, ranks)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, ranks)), "a rank outlived the submit command"


def test_a_run_folder_belongs_to_one_run_and_attach_follows_it(tmp_path):
    out = tmp_path / "run"
    p = start_submit(*LONG[:-4], "--steps", "150", "--cluster", "local", "--out", out, cwd=tmp_path)
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        # a second run on the same folder, and a resume of a run that is still going: both refused
        again = run_submit(*LONG, "--out", out, cwd=tmp_path, timeout=120)
        assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr
        resume = run_submit("--resume", out, cwd=tmp_path, timeout=120)
        assert resume.returncode == 2, resume.stderr
        assert "still RUNNING: follow it with --attach" in resume.stderr or "no checkpoint" in resume.stderr
        # the submit command dies (a closed laptop lid): the job goes on, --attach picks it up
        p.kill()
        p.wait()
        attached = run_submit("--attach", out, cwd=tmp_path, timeout=600)
    finally:
        p.kill()
    assert attached.returncode == 0, attached.stdout[-2000:] + attached.stderr[-2000:]
    assert "attached to job" in attached.stdout and "results in" in attached.stdout
    assert json.loads((out / "result.json").read_text())["steps"] == 150


def test_an_injected_hang_is_named_by_rank_stage_and_action_within_the_bound(tmp_path):
    """MPS_FAULT=hang (tests only) makes rank 1 of a 3-stage pipeline stop responding at step 3:
    the table names rank 1, its stage and its action, within --dist-timeout + 15 s of the hang."""
    out = tmp_path / "run"
    env = dict(os.environ, MPS_FAULT="hang:rank=1:step=3")
    args = (*LONG[:3], "3", *LONG[4:], "--dist-timeout", "20", "--hang-timeout", "8", "--out", out)
    p = start_submit(*args, cwd=tmp_path, env=env)
    try:
        wait_for_text(rank0_log(str(out)), "step 1/")
        hung_at = time.time()  # an upper bound: the hang begins at step 3, after step 1 was logged
        stdout, stderr = p.communicate(timeout=200)
        ended = time.time()
    finally:
        p.kill()
    assert p.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert ended - hung_at <= 20 + 15 + 10  # dist-timeout + 15 s, + the steps before the hang
    assert "no progress: what each rank is doing" in stdout  # the watchdog's table, while it waits
    line = stderr.strip().splitlines()[-1]
    assert "rank 1 (stage 1)" in line and "stopped making progress, at step 3" in line, line
    assert "not responding (MPS_FAULT hang" in line
    table = stdout[stdout.rindex("what each rank was doing") :]
    row = next(r for r in table.splitlines() if r.startswith("->"))
    assert row.split()[1:4] == ["1", os.uname().nodename, "1"], row  # rank, node, stage
    waiting = [r for r in table.splitlines() if "waiting" not in r and "rank 1 (stage 1)" in r]
    assert waiting, table  # a neighbour names rank 1 as the peer it waits for


def test_a_rank_that_raises_is_named_by_its_own_error_not_as_a_hang(tmp_path):
    """Rank 0 raises after step 1; rank 1 only waited for it. The line is rank 0's error, with no
    "no progress" table and no "stopped making progress" (both told a crash as a hang)."""
    out = tmp_path / "run"
    env = dict(os.environ, MPS_FAULT="crash:rank=0:step=1")
    p = run_submit(*LONG[:7], "5", *LONG[8:], "--max-retries", "0", "--out", out, cwd=tmp_path, env=env)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert "failed: rank 0: core.training.faults.InjectedFaultError: MPS_FAULT: rank 0 crashed" in line, line
    assert "stopped making progress" not in p.stderr + p.stdout
    assert "what each rank" not in p.stdout and "no progress" not in p.stdout


def _report(folder, rank: int, at: float, reason: str, **kw) -> None:
    (folder / "hang").mkdir(exist_ok=True)
    r = dict(rank=rank, node="vm", step=3, stage=rank, microbatch=None, action="forward", waiting_for=None)
    r.update(waits_on=None, last_progress_at=at - 10, reported_at=at, reason=reason)
    r.update(kw)
    (folder / "hang" / f"rank-{rank}.json").write_text(json.dumps(r))


def test_the_verdict_tells_a_crash_from_a_stop_and_forgets_a_previous_attempt(tmp_path):
    from jobs.launch import hang_report

    now = time.time()
    # a crash: rank 1's own error and rank 0's lost peer; no table, the message (blame's) stands
    _report(tmp_path, 0, now, "RuntimeError: Connection closed by peer")
    _report(tmp_path, 1, now, "ValueError: bad batch")
    line, table = hang_report.verdict("rank 1: ValueError: bad batch", hang_report.read_reports(tmp_path), 2)
    assert line == "rank 1: ValueError: bad batch" and table is None
    # a stop: rank 1 wrote nothing while rank 0's watchdog did; the table seen then names rank 1,
    # and keeps naming it after rank 1 wakes (SIGCONT) and writes a fresher report than rank 0's
    _report(tmp_path, 0, now, "no progress for 30 s (--hang-timeout 30)")
    (tmp_path / "hang" / "rank-1.json").unlink()
    said = []
    watch = hang_report.HangWatch(str(tmp_path), 2, said.append)
    watch.tick()
    assert watch.first_stalled is None and "no progress" in said[0]  # rank 1's watchdog may be late yet
    watch.missing_since[1] -= 13  # ... but not past the grace (2 watchdog periods of 5 s, + 2 s)
    watch.checked = 0
    watch.tick()
    assert watch.first_stalled.startswith("rank 1 wrote no report")
    _report(tmp_path, 1, now + 40, "no progress for 40 s (--hang-timeout 30)", waits_on=0)
    reports = hang_report.read_reports(tmp_path)
    line, table = hang_report.verdict("rank 0: timed out", reports, 2, watch.at_end(reports))
    assert line.startswith("rank 1 wrote no report (stopped or killed)") and table
    # a resumed run: the previous attempt's reports are not shown as this one's
    said.clear()
    hang_report.HangWatch(str(tmp_path), 2, said.append, since=now + 60).tick()
    assert said == [] and hang_report.read_reports(tmp_path, since=now + 60) == {}


def test_a_rank_whose_watchdog_reports_after_its_peers_is_not_taken_for_a_stopped_one(tmp_path):
    """CI once saw rank 0's report alone (each rank's watchdog fires --hang-timeout after its own
    last progress, and looks only every few seconds) and named the hung rank 1 "stopped or killed";
    rank 1's report came a moment later. A report within the grace counts: the chain of waits decides."""
    from jobs.launch import hang_report

    now = time.time()
    _report(tmp_path, 0, now, "no progress for 4 s (--hang-timeout 4)", waits_on=1, hang_timeout_s=4)
    watch = hang_report.HangWatch(str(tmp_path), 2, lambda line: None)
    watch.tick()
    assert watch.first_stalled is None and watch.missing_since == {1: watch.checked}
    _report(tmp_path, 1, now + 1, "no progress for 4 s (--hang-timeout 4)", hang_timeout_s=4)
    reports = hang_report.read_reports(tmp_path)
    line, table = hang_report.verdict("rank 0 was killed by SIGKILL", reports, 2, watch.at_end(reports))
    assert line.startswith("rank 1 (stage 1) on vm stopped making progress"), line
    assert table and "->" in table.splitlines()[2]  # rank 1's row is marked


def test_a_full_disk_is_said_when_the_ranks_could_not_write_their_errors(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from jobs.launch import blame

    job = SimpleNamespace(num_tasks=2, paths=SimpleNamespace(folder=tmp_path))
    job.task = lambda i: SimpleNamespace(paths=SimpleNamespace(stderr=tmp_path / f"{i}.err"))
    assert blame.job_failure(job) == "no task wrote anything to its stderr"
    full = os.statvfs_result((4096, 4096, 100, 0, 0, 100, 0, 0, 0, 255))
    monkeypatch.setattr(blame.os, "statvfs", lambda path: full)
    line = blame.job_failure(job)
    assert line.startswith(f"the disk holding {tmp_path} is full (No space left on device)"), line


def test_a_requeue_says_the_error_that_caused_it_and_the_attempt(tmp_path, monkeypatch):
    """Slurm's answers as a --max-retries requeue gives them (running, back to pending with
    BeginTime, running, completed): the user reads the failed attempt's error and the attempt
    number, not only "pending: BeginTime"."""
    from types import SimpleNamespace

    from core.config import RunConfig
    from jobs.launch import watch

    (tmp_path / "0.err").write_text("Traceback ...\nValueError: the loss is nan\n")
    job = SimpleNamespace(job_id="7", num_tasks=1, paths=SimpleNamespace(folder=tmp_path))
    job.task = lambda i: SimpleNamespace(
        paths=SimpleNamespace(stderr=tmp_path / f"{i}.err", stdout=tmp_path / "0.out", result_pickle=tmp_path / "r")
    )
    answers = itertools.chain(["RUNNING", "PENDING", "RUNNING"], itertools.repeat("FAILED"))
    asked = []

    def query(job_id):
        asked.append(job_id)
        return watch.SlurmAnswer(True, next(answers), "BeginTime", "vm")

    monkeypatch.setattr(watch, "query_job", query)
    monkeypatch.setattr(watch, "slurm_results_written", lambda job: len(asked) >= 4)  # then an error result
    said, restarted = [], []
    with pytest.raises(watch.JobFailed):
        watch.wait_for(
            job, "slurm", RunConfig(max_retries=2), echo=False, say=said.append, on_requeue=lambda: restarted.append(1)
        )
    requeue = [s for s in said if "requeued" in s]
    assert requeue == [
        "job 7 requeued after attempt 1 of at most 3, which failed: rank 0: ValueError: the loss is nan; "
        "attempt 2 resumes from the last checkpoint"
    ], said
    assert restarted == [1]


def test_slurms_own_oom_evidence_is_the_reason_and_a_rank_that_raised_first_is_no_death():
    """Slurm's words as a cgroup-enforcing cluster writes them (this test cluster has no cgroups, so
    no real OOM under Slurm): slurmstepd's oom_kill line, or the job state OUT_OF_MEMORY, is the
    reason for the task srun reports Killed; a task that exited with an error first is no death."""
    from jobs.launch import blame, exits

    killed = "srun: error: gpu7: task 1: Killed\nsrun: Terminating StepId=41.0\n"
    oom = "slurmstepd: error: Detected 1 oom_kill event in StepId=41.0. Some of the step tasks have been OOM Killed.\n"
    texts = {0: oom + killed + "RuntimeError: Connection closed by peer\n", 1: ""}
    line = blame.first_failure(texts, 2, exits.slurm_deaths(texts))
    assert line.startswith("rank 1 was killed by SIGKILL (the OOM killer: slurmstepd: Detected 1 oom_kill event"), line
    assert line.endswith("rank 0 then saw: RuntimeError: Connection closed by peer"), line
    no_step_line = {0: killed, 1: ""}
    said = exits.slurm_deaths(no_step_line, "OUT_OF_MEMORY")
    assert said == {1: "killed by SIGKILL (the OOM killer: Slurm reports the job OUT_OF_MEMORY)"}
    assert exits.slurm_deaths(no_step_line) == {1: "killed by SIGKILL; no reason was recorded"}
    raised_first = {0: "srun: error: gpu7: task 0: Exited with exit code 1\n" + killed, 1: ""}
    assert exits.slurm_deaths(raised_first, "OUT_OF_MEMORY") == {}
