"""How a rank process ended: the signal by name, and the kernel's or Slurm's reason where one was recorded.

A rank killed by a signal writes no error of its own. What is known comes from outside it:
- its exit status: the local controller below records each task's as it ends; under Slurm, srun
  reports it in words ("task 1: Killed", "task 1: Segmentation fault");
- the kernel: the OOM killer's line in the kernel log (``Killed process PID``), and the memory
  cgroup's own count of OOM kills (cgroup v2 ``memory.events``, v1 ``memory.oom_control``);
- Slurm: the job state OUT_OF_MEMORY, slurmstepd's ``Detected N oom_kill event`` line.
Where none of them says why, the signal is named and so is the absence of a recorded reason.

The local executor's controller is submitit's, with one addition: it writes each task's end into
``<log folder>/<job id>_exits.json`` (started by jobs.launch.executor as
``python -m jobs.launch.exits FOLDER``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from submitit.local.local import Controller, LocalJobEnvironment

KMSG_OOM = re.compile(r"Killed process (\d+)|oom-kill:.*\bpid=(\d+)")
SLURM_OOM = re.compile(r"slurmstepd: error: (Detected \d+ oom[-_]kill event.*?)\s*$", re.M)
SRUN_WORDS = {signal.strsignal(s): s.name for s in signal.Signals if signal.strsignal(s)}
"""What srun (strsignal) says of a task a signal ended -> the signal's name: Killed -> SIGKILL."""
SRUN_TASK = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+)")
"""srun's report of how tasks ended: ``srun: error: vm: task 1: Killed``, ``tasks 0-1: Exited ...``."""


def task_ids(spec: str) -> list[int]:
    """The tasks of srun's ``1``, ``0,2`` or ``0-3``."""
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def exits_path(folder: str, job_id: str) -> str:
    return os.path.join(str(folder), f"{job_id}_exits.json")


def oom_counter(pid: int) -> str | None:
    """The file holding the OOM-kill count of ``pid``'s memory cgroup (v2 memory.events, v1
    memory.oom_control), or None where neither is readable."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                events = os.path.join(root, path, "memory.events")
                if os.path.exists(events):
                    return events
        elif "memory" in controllers.split(","):
            control = os.path.join("/sys/fs/cgroup/memory", path, "memory.oom_control")
            if os.path.exists(control):
                return control
    return None


def oom_kills(counter: str | None) -> int | None:
    try:
        with open(counter) as f:  # type: ignore[arg-type]
            m = re.search(r"^oom_kill (\d+)", f.read(), re.M)
    except (OSError, TypeError):
        return None
    return int(m.group(1)) if m else None


def kernel_oom_line(pid: int) -> str | None:
    """The kernel log's OOM-killer line for ``pid``, where the kernel log can be read (root)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # a record overwritten while reading: go on with the next
                continue
            m = KMSG_OOM.search(record)
            if m and int(m.group(1) or m.group(2)) == pid:
                found = record.split(";", 1)[-1].strip().splitlines()[0]
    finally:
        os.close(fd)
    return found


def describe(returncode: int, oom: str | None = None, consulted: bool = False) -> str | None:
    """ "killed by SIGKILL (...)" for a process a signal ended (None for an ordinary exit): the
    reason where a source recorded one, else that none was; ``consulted``: an OOM count was read."""
    if returncode >= 0 and not (128 < returncode < 128 + 65):
        return None
    signum = -returncode if returncode < 0 else returncode - 128
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if oom:
        return f"killed by {name} (the OOM killer: {oom})"
    oom_checked = consulted and signum == signal.SIGKILL  # the OOM killer sends SIGKILL only
    checked = " (not by the OOM killer: its memory cgroup counted no OOM kill)" if oom_checked else ""
    return f"killed by {name}; no reason was recorded{checked}"


def local_deaths(folder: str, job_id: str) -> dict[int, str]:
    """rank -> how it died, for the rank whose death by a signal was the first end of the local
    job (the ranks the launcher ends afterwards die by its SIGKILL: they are not news)."""
    try:
        with open(exits_path(folder, job_id)) as f:
            ends = json.load(f)
    except (OSError, ValueError):
        return {}
    if not ends:
        return {}
    first = min(ends, key=lambda e: e["at"])
    how = describe(first["returncode"], first.get("oom"), first.get("oom_kills_before") is not None)
    return {int(first["task"]): how} if how else {}


def slurm_deaths(texts: dict[int, str], job_state: str | None = None) -> dict[int, str]:
    """rank -> how it died, from srun's report of the first task to end, when a signal ended it:
    Slurm's own OOM evidence (slurmstepd's oom_kill line, the job state OUT_OF_MEMORY) is its reason."""
    text = "\n".join(texts.values())
    first = SRUN_TASK.search(text)
    if not first:
        return {}
    name = SRUN_WORDS.get(first.group("what").strip().rstrip("."))
    if name is None:  # "Exited with exit code 1": the first to end raised; blame has its words
        return {}
    oom = SLURM_OOM.search(text)
    reason = f"slurmstepd: {oom.group(1)}" if oom else None
    if reason is None and (job_state or "").startswith("OUT_OF_MEMORY"):
        reason = "Slurm reports the job OUT_OF_MEMORY"
    task = task_ids(first.group("tasks"))[0]
    how = f"killed by {name} (the OOM killer: {reason})" if reason else f"killed by {name}; no reason was recorded"
    return {task: how}


class RecordingController(Controller):
    """submitit's local controller, writing each task's end (exit status, time, the OOM killer's
    evidence) into the exits file as it happens, before the launcher may kill the rest."""

    def wait(self, freq: int = 24):  # the loop of submitit's Controller.wait, plus the record
        ends: list[dict] = []
        counters: dict[int, tuple[str | None, int | None]] = {}
        timeout, almost = freq * self.timeout_s, freq * (self.timeout_s - self.signal_delay_s)
        for tick in range(timeout):
            codes = [t.poll() for t in self.tasks]
            for k, (task, code) in enumerate(zip(self.tasks, codes)):
                if code is None and tick % 12 == 0:  # where it is now: a test may move it to a limited cgroup
                    counter = oom_counter(task.pid)
                    if counter != counters.get(k, (None,))[0]:
                        counters[k] = (counter, oom_kills(counter))
                elif code is not None and all(e["task"] != k for e in ends):
                    ends.append(self._end(k, task.pid, code, *counters.get(k, (None, None))))
                    self._write(ends)
            if all(c is not None for c in codes):
                return codes
            if tick == almost:
                self._forward_signal(LocalJobEnvironment._usr_sig())
            time.sleep(1.0 / freq)
        return [t.poll() for t in self.tasks]

    @staticmethod
    def _end(task: int, pid: int, code: int, counter: str | None, before: int | None) -> dict:
        end = {"task": task, "pid": pid, "returncode": code, "at": time.time(), "oom_kills_before": before}
        if code < 0 and -code == signal.SIGKILL:
            after = oom_kills(counter)
            line = kernel_oom_line(pid)
            if line:
                end["oom"] = f"kernel log: {line}"
            elif before is not None and after is not None and after > before:
                end["oom"] = f"{counter} oom_kill {before} -> {after}"
        return end

    def _write(self, ends: list[dict]) -> None:
        path = exits_path(str(self.folder), self.pid)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(ends, f)
            os.replace(tmp, path)
        except OSError:  # a full disk: the verdict goes without it
            pass


if __name__ == "__main__":
    RecordingController(Path(sys.argv[1])).run()
