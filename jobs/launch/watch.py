"""Watching a submitted job: what Slurm says, what it does not say, and the rank 0 log as it grows.

The rule this module keeps: silence is not an answer. A controller that does not answer (restart,
overload, network) is reported as such ("not answering since HH:MM:SS, still waiting") and the
watch goes on; only Slurm saying the job has ended, or forgetting it, ends a job without results.
submitit asks sacct, which needs an accounting daemon many clusters lack; squeue and scontrol
need only the controller.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs.launch.blame import job_failure
from jobs.launch.nodes import expand_nodelist, explain_failure, is_bad, node_health
from jobs.launch.processes import children, kill_local

QUERY_TIMEOUT_S = 25.0
"""One squeue/scontrol call. A controller that is down makes each call fail after ~18 s (its
MessageTimeout and retries); a shorter limit would call a slow answer silence."""

ENDED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "COMPLETED")
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "RESIZING")
# words of an error that mean "the job id is not known", as opposed to "no answer"
UNKNOWN_JOB = re.compile(r"invalid job id|unknown job|no such job", re.I)


@dataclass(frozen=True)
class SlurmAnswer:
    answered: bool
    """False when the controller did not answer: nothing is known about the job then."""
    state: str | None = None
    """squeue's state (PENDING, RUNNING, ...), scontrol's for a job that left the queue; None when
    Slurm answered that it does not know the job."""
    reason: str | None = None
    nodes: str | None = None
    error: str | None = None


def _call(cmd: list[str], env: dict | None = None) -> tuple[int, str, str] | None:
    """(rc, stdout, stderr), or None when the command could not run or took too long."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.returncode, p.stdout, p.stderr


def query_job(job_id: str) -> SlurmAnswer:
    """The job's state, pending reason and nodes, telling "no answer" from "no such job"."""
    r = _call(["squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%N"])
    if r is None:
        return SlurmAnswer(False, error="squeue did not answer")
    rc, out, err = r
    if rc == 0 and out.strip():
        state, reason, nodes = (out.strip().splitlines()[0].split("|") + ["", ""])[:3]
        return SlurmAnswer(True, state, reason if reason not in ("None", "") else None, nodes or None)
    if rc != 0 and not UNKNOWN_JOB.search(err):
        return SlurmAnswer(False, error=err.strip().splitlines()[-1] if err.strip() else f"squeue exit {rc}")
    # not in the queue any more: scontrol remembers finished jobs for MinJobAge
    r = _call(["scontrol", "-o", "show", "job", str(job_id)])
    if r is None:
        return SlurmAnswer(False, error="scontrol did not answer")
    rc, out, err = r
    if rc != 0:
        if UNKNOWN_JOB.search(err):
            return SlurmAnswer(True, None)
        return SlurmAnswer(False, error=err.strip().splitlines()[-1] if err.strip() else f"scontrol exit {rc}")
    fields = dict(re.findall(r"(\w+)=(\S*)", out))
    reason = fields.get("Reason")
    return SlurmAnswer(
        True, fields.get("JobState"), None if reason in (None, "None") else reason, fields.get("NodeList")
    )


def unavailable_nodes(reason: str | None) -> str:
    """Why the nodes a pending job waits for cannot run it: drained, down or failing ones, named
    with the reason an admin gave."""
    if not reason or not re.search(r"ReqNodeNotAvail|Nodes.required|Resources|NodeDown|DRAIN", reason, re.I):
        return ""
    named = re.search(r"UnavailableNodes:(\S+)", reason)
    health = node_health(expand_nodelist(named.group(1)) if named else [])
    words = (("DRAIN", "drained"), ("DOWN", "down"), ("FAIL", "failing"), ("NOT_RESPONDING", "not responding"))
    bad = [
        f"node {name} is {next((w for k, w in words if k in state.upper()), 'unavailable')} ({state}"
        + (f", reason: {why})" if why else ")")
        for name, (state, why) in health.items()
        if is_bad(state)
    ]
    return "; ".join(bad)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _elapsed(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class SlurmWatch:
    """Polls one job and says what changed: pending reasons, controller silence and its end.

    ``poll()`` returns the last known answer; ``ended_for`` how long Slurm has said the job is over
    (or forgotten), 0 while it is active or while nothing is known."""

    def __init__(
        self,
        job_id: str,
        say: Callable[[str], None],
        every_s: float = 3.0,
        remind_s: float = 60.0,
        on_requeue: Callable[[int], None] | None = None,
    ):
        self.job_id, self.say = job_id, say
        self.on_requeue = on_requeue
        """Called with the attempt that ended when the job goes from running back to the queue."""
        self.attempts = 1
        self.every_s, self.remind_s = every_s, remind_s
        self.started = time.time()
        self.last = SlurmAnswer(True, "PENDING")
        self.checked = 0.0
        self.silent_since: float | None = None
        self.reminded = 0.0
        self.reason_shown: str | None = None
        self.ended_since: float | None = None

    @property
    def ended_for(self) -> float:
        return time.time() - self.ended_since if self.ended_since else 0.0

    def poll(self, force: bool = False) -> SlurmAnswer:
        now = time.time()
        if not force and now - self.checked < self.every_s:
            return self.last
        a = query_job(self.job_id)
        self.checked = time.time()
        if not a.answered:
            if self.silent_since is None:
                self.silent_since = self.reminded = now
                self.say(
                    f"slurm: controller not answering since {_clock(now)} ({a.error}); still waiting: job "
                    f"{self.job_id} runs on if it had started, and is not declared failed on silence"
                )
            elif now - self.reminded >= self.remind_s:
                self.reminded = now
                self.say(f"slurm: controller still not answering (since {_clock(self.silent_since)}), still waiting")
            return self.last  # nothing learned: the last answer stands, and no end is counted
        if self.silent_since is not None:
            self.say(
                f"slurm: controller answers again after {time.time() - self.silent_since:.0f} s; "
                f"job {self.job_id} is {a.state or 'no longer known'}"
            )
            self.silent_since = None
        if a.state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") and self.last.state in ("RUNNING", "COMPLETING"):
            # back in the queue after running: a requeue (--max-retries), not a first wait
            self.attempts += 1
            self.reason_shown = None
            if self.on_requeue is not None:
                self.on_requeue(self.attempts - 1)
        if a.state == "PENDING":
            if a.reason and a.reason != self.reason_shown:
                self.reason_shown = a.reason
                nodes = unavailable_nodes(a.reason)
                self.say(
                    f"job {self.job_id} pending for {_elapsed(now - self.started)}: {a.reason}"
                    + (f"; {nodes}" if nodes else "")
                )
        over = a.state is None or a.state.split()[0].rstrip("+") in ENDED or a.state == "PREEMPTED"
        self.ended_since = (self.ended_since or now) if over else None
        self.last = a
        return a


def follow(
    stdout_path: Callable[[], str | None],
    finished: Callable[[], bool],
    watch: SlurmWatch | None = None,
    grace_s: float = 10.0,
    echo: bool = True,
    on_vanished: Callable[[SlurmAnswer], None] | None = None,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Print rank 0's log as it grows until ``finished()``; under Slurm also poll ``watch`` and,
    once Slurm has said for ``grace_s`` that the job is over without ``finished()``, call
    ``on_vanished`` (which raises)."""
    pos = 0
    while True:
        done = finished()
        if watch is not None and not done:
            a = watch.poll()
            if watch.ended_for > grace_s and not finished() and on_vanished is not None:
                on_vanished(a)
        path = stdout_path()
        if echo and path:
            try:
                with open(path, errors="replace") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
            except OSError:
                chunk = ""
            for line in chunk.splitlines():
                if not line.startswith("submitit "):
                    print(f"  | {line}", flush=True)
        if on_tick is not None:
            on_tick()
        if done:
            return
        time.sleep(0.5)


LOCAL_KILL_GRACE_S = 5.0
"""After a local rank failed, its peers get this long to fail too (and write their own errors)."""


def _a_task_failed(job) -> bool:
    from submitit.core.utils import pickle_load

    for i in range(job.num_tasks):
        path = job.task(i).paths.result_pickle
        try:
            if path.exists() and pickle_load(path)[0] != "success":
                return True
        except Exception:  # noqa: BLE001 - a pickle being written: ask again next time
            continue
    return False


def _a_task_died(job, seen_all: list[bool]) -> bool:
    """A rank process gone without a result file: killed (OOM killer, kill -9) or aborted (NCCL's
    watchdog ends a process with SIGABRT after a collective timeout). On gloo its peers notice
    and fail with an error of their own; on NCCL a peer stuck elsewhere never does (2 H200s: the
    hung rank outlived its aborted peer until the submit command was interrupted). Counted once
    every rank has been seen running, so a job still starting is not mistaken for a dead one."""
    live = len(children(job._process.pid))  # before the files: a rank writes its result, then exits
    if live >= job.num_tasks:
        seen_all[0] = True
        return False
    written = sum(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))
    return seen_all[0] and job.num_tasks - live - written > 0


class JobFailed(RuntimeError):
    """The job ended without results; the message is the one line the user gets. ``cancelled``:
    Slurm says it was cancelled (scancel), which is said as such, not as a failure."""

    def __init__(self, message: str, cancelled: bool = False) -> None:
        super().__init__(message)
        self.cancelled = cancelled


def slurm_results_written(job) -> bool:
    """Every task wrote its result file. Asked of the files, not of submitit, whose sacct calls
    fail (and print) on clusters without an accounting daemon."""
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def slurm_results(job) -> list:
    """The tasks' return values read from their result files; a task's error raises."""
    from submitit.core.utils import pickle_load

    out = []
    for i in range(job.num_tasks):
        outcome, value = pickle_load(job.task(i).paths.result_pickle)
        if outcome != "success":
            raise RuntimeError(f"task {i} failed")
        out.append(value)
    return out


def wait_for(
    job,
    cluster: str,
    cfg=None,
    echo: bool = True,
    say: Callable[[str], None] = print,
    on_tick: Callable[[], None] | None = None,
    on_requeue: Callable[[], None] | None = None,
) -> list:
    """Follow ``job`` to its end: the tasks' return values, or JobFailed naming the rank (and the
    node, jobs.launch.nodes) that failed first."""
    slurm = cluster == "slurm"

    def requeued(attempt: int) -> None:
        retries = getattr(cfg, "max_retries", None)
        of = f" of at most {retries + 1}" if retries is not None else ""
        why = job_failure(job)
        # the failing rank usually says it itself (jobs.launch.task: "rank 1 failed (...); job requeued,
        # attempt 2 of at most 3, ..."): quoted as it is, not wrapped in a second account of it
        own = re.match(r"rank (\d+): (rank \1 failed .*job requeued.*)", why)
        if own:
            say(f"job {job.job_id} requeued after attempt {attempt}: {own.group(2)}")
        else:
            say(
                f"job {job.job_id} requeued after attempt {attempt}{of}, which failed: {why}; "
                f"attempt {attempt + 1} resumes from the last checkpoint"
            )
        if on_requeue is not None:
            on_requeue()

    watch = SlurmWatch(str(job.job_id), say, on_requeue=requeued) if slurm else None

    def vanished(a: SlurmAnswer) -> None:
        cancelled = (a.state or "").startswith("CANCELLED")
        why = job_failure(job, a.state)
        raise JobFailed(f"Slurm reports {a.state or 'no such job'} and no result was written; {why}", cancelled)

    failed_since: list[float] = []
    all_seen = [False]

    def local_done() -> bool:
        """Like srun's --kill-on-bad-exit for the local executor: a rank that failed ends the job
        (its peers would wait in a collective until --dist-timeout)."""
        if job.done():
            return True
        if (cfg is None or cfg.kill_on_bad_exit) and (_a_task_failed(job) or _a_task_died(job, all_seen)):
            failed_since.append(time.time())
            if time.time() - failed_since[0] > LOCAL_KILL_GRACE_S:
                kill_local(job._process)
                return True
        return False

    try:
        follow(
            lambda: str(job.task(0).paths.stdout),
            (lambda: slurm_results_written(job)) if slurm else local_done,
            watch,
            echo=echo,
            on_vanished=vanished,
            on_tick=on_tick,
        )
        return slurm_results(job) if slurm else job.results()
    except JobFailed as e:
        raise JobFailed(explain_failure(job, str(e), cfg) if slurm else str(e), e.cancelled) from None
    except Exception:  # a task's error re-raised by submitit: the first failing rank, in its words
        if not slurm:
            raise JobFailed(job_failure(job)) from None
        # scancel: the ranks stop on its SIGTERM and write their errors before Slurm ends the job
        state = final_state(str(job.job_id))
        raise JobFailed(explain_failure(job, job_failure(job, state), cfg), state.startswith("CANCELLED")) from None


def final_state(job_id: str, within_s: float = 40.0) -> str:
    """Slurm's state for a job whose ranks have all ended, once it is no longer active (COMPLETING
    lasts until the step's processes are gone: KillWait at most); "" when it does not say in time."""
    deadline = time.time() + within_s
    while True:
        a = query_job(job_id)
        if a.answered and a.state and a.state.split()[0].rstrip("+") not in ACTIVE:
            return a.state
        if time.time() > deadline:
            return ""
        time.sleep(1.0)
