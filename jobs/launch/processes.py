"""The local controller's ranks, read from /proc: what stopping and watching a local job count and kill."""

from __future__ import annotations

import contextlib
import os
import signal


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the local controller's ranks), from /proc."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def kill_local(process) -> None:
    for child in children(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(Exception):
        process.wait(timeout=10)
