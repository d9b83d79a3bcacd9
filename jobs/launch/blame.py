"""Which rank failed first, in its own words: the line a failed job is summed up in.

When one rank dies, its peers fail too, with errors about the peer ("Connection reset by peer",
a collective timeout). Naming the first rank whose stderr holds such an error blames a survivor.
The order of evidence:
1. a rank's own error (an exception that is not about a lost peer);
0. a rank whose death by a signal was the job's first end, with the signal's name and the
   kernel's or Slurm's reason (jobs.launch.exits): "rank 1 was killed by SIGKILL (the OOM killer: ...)";
2. a rank with NO error of its own while its peers report a lost peer: it was killed (kill -9,
   the OOM killer) or stopped (SIGSTOP, a hung driver) - what srun said about its task
   ("task 1: Killed") is quoted when present;
3. the peers' secondary errors;
4. whatever a task printed before Python could raise (srun, the container, the node).

Read from every task's stderr, never by asking submitit for results: a task killed by Slurm
(--kill-on-bad-exit) writes none, and waiting for it would hang.
"""

from __future__ import annotations

import os
import re

from jobs.launch.exits import SRUN_TASK, local_deaths, slurm_deaths, task_ids

SECONDARY = (
    "timed out",
    "timeout",
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "communicator was aborted",
    "job did not complete",
    "socket",
    "connection refused",
)
"""Error words that describe a lost peer, not a rank's own fault."""

KILLED = re.compile(r"\brank \d+ was killed by ")
"""How a verdict names a rank a signal ended (a death, not a stall: no "no progress" table)."""


def exception_line(text: str) -> str:
    """The 'SomeError: message' line of a traceback that submitit re-raised as text."""
    text = text.split("You can check full logs")[0]
    lines = [ln.split("]: ", 1)[-1] for ln in text.splitlines() if ln.strip() and not ln.startswith("---")]
    hits = [ln.strip() for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln.strip())]
    return hits[-1] if hits else (lines[-1].strip() if lines else "no message")


def srun_reports(texts: dict[int, str]) -> dict[int, str]:
    """task -> what srun said about it ("Killed", "Exited with exit code 1"), first report kept.
    srun writes into the batch step's stderr, which submitit shares with task 0's."""
    out: dict[int, str] = {}
    for text in texts.values():
        for m in SRUN_TASK.finditer(text):
            for t in task_ids(m.group("tasks")):
                out.setdefault(t, f"srun: {m.group('node')}: task {t}: {m.group('what').strip()}")
    return out


def is_secondary(message: str) -> bool:
    return any(k in message.lower() for k in SECONDARY)


def first_failure(texts: dict[int, str], num_tasks: int, deaths: dict[int, str] | None = None) -> str:
    """One line naming the rank that failed first (see the module docstring); ``texts`` maps each
    task to its stderr, ``deaths`` the rank whose death by a signal ended the job first to how."""
    srun = srun_reports(texts)
    errors = {i: exception_line(t) for i, t in sorted(texts.items()) if re.search(r"(Error|Exception)\b", t)}
    for i, how in (deaths or {}).items():  # 0. killed by a signal before anything else ended
        peer = next(((p, msg) for p, msg in errors.items() if p != i), None)
        return f"rank {i} was {how}" + (f"; rank {peer[0]} then saw: {peer[1]}" if peer else "")
    for i, msg in errors.items():  # 1. a rank's own error
        if not is_secondary(msg):
            return f"rank {i}: {msg}"
    if errors:  # 2. peers lost a peer: the rank with no error of its own is the one that went away
        silent = [i for i in range(num_tasks) if i not in errors]
        if silent:
            i = silent[0]
            said = srun.get(i)
            peer, msg = next(iter(errors.items()))
            how = f" ({said})" if said else ""
            return f"rank {i} stopped or was killed without an error of its own{how}; rank {peer} then saw: {msg}"
        i, msg = next(iter(errors.items()))  # 3. everyone reports a lost peer
        return f"rank {i}: {msg}"
    # 4. died before Python could raise: the first error line that is not srun's exit report is the
    # cause (slurmstepd's execve failure, a missing container runtime); srun's report follows it
    for i, text in sorted(texts.items()):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("submitit ")]
        cause = next((ln for ln in lines if "error" in ln.lower() and not SRUN_TASK.search(ln)), None)
        if cause:
            return f"task {i} stderr: {cause}"
    if srun:
        return next(iter(srun.values()))
    for i, text in sorted(texts.items()):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("submitit ")]
        if lines:
            return f"task {i} stderr: {lines[-1]}"
    return "no task wrote anything to its stderr"


def full_disk(folder: str) -> str | None:
    """``No space left on device`` when the disk holding ``folder`` has no free block: the ranks'
    own error logs were to be written there, so their silence is the disk's doing."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):
        return f"the disk holding {folder} is full (No space left on device): free space there and resume"
    return None


def job_failure(job, job_state: str | None = None) -> str:
    """first_failure() of a submitit job, from its tasks' stderr files and how they ended (the local
    controller's record, srun's words, Slurm's ``job_state``); a full disk, where it is why nothing
    useful could be written, leads."""
    texts = {}
    for i in range(job.num_tasks):
        try:
            with open(job.task(i).paths.stderr, errors="replace") as f:
                texts[i] = f.read()
        except OSError:
            continue
    deaths = local_deaths(str(job.paths.folder), str(job.job_id)) if hasattr(job, "_process") else {}
    found = first_failure(texts, job.num_tasks, deaths or slurm_deaths(texts, job_state))
    disk = full_disk(str(job.paths.folder)) if hasattr(job, "paths") else None
    if disk and "No space left on device" not in found:
        return f"{disk}; {found}"
    return found
