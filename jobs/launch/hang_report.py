"""The table a stalled or timed-out job is explained by: rank, node, stage, action, whom it waits
for, last progress. Read from the reports the ranks write into ``<run>/hang/`` (core/training/progress.py).

The rank that stopped is the one at the end of the chain of waits (each report says whose data
the rank waits for); a rank with no report at all could not write one (stopped, killed) and is
listed as such.
"""

from __future__ import annotations

import glob
import json
import os
import time

from jobs.launch.blame import KILLED, is_secondary

WATCHDOG = "no progress for"
"""How the watchdog's own reports begin (core.training.progress): a rank alive and silent. Any
other reason is the error a rank raised (jobs.launch.task writes it as it fails)."""


def read_reports(run_dir: str, since: float | None = None) -> dict[int, dict]:
    """Every rank's report; with ``since``, only those written after it (a resumed run's folder
    still holds the previous attempt's)."""
    out = {}
    for path in glob.glob(os.path.join(run_dir, "hang", "rank-*.json")):
        try:
            with open(path) as f:
                r = json.load(f)
            if since is None or r["reported_at"] >= since:
                out[int(r["rank"])] = r
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def raised(reports: dict[int, dict]) -> list[int]:
    """Ranks that failed with an error of their own (not the watchdog's silence, not a lost peer)."""
    return sorted(
        rank
        for rank, r in reports.items()
        if r.get("reason") and not r["reason"].startswith(WATCHDOG) and not is_secondary(r["reason"])
    )


def _ago(t: float, now: float) -> str:
    return f"{now - t:.0f} s ago ({time.strftime('%H:%M:%S', time.localtime(t))})"


def table(reports: dict[int, dict], world_size: int | None = None) -> str:
    """One row per rank, the stalled-first rank marked; ranks without a report listed too."""
    if not reports:
        return ""
    now = max(r["reported_at"] for r in reports.values())
    first = culprit(reports)
    rows = [("", "rank", "node", "stage", "step", "micro-batch", "action", "waiting for", "last progress")]
    for rank in range(world_size or max(reports) + 1):
        r = reports.get(rank)
        if r is None:
            gone = "no report: stopped or killed before it could write"
            rows.append(("", str(rank), "?", "?", "?", "?", gone, "", ""))
            continue
        rows.append(
            (
                "->" if rank == first else "",
                str(rank),
                r["node"],
                "-" if r.get("stage") is None else str(r["stage"]),
                str(r["step"]),
                "-" if r.get("microbatch") is None else str(r["microbatch"]),
                r["action"],
                r.get("waiting_for") or "",
                _ago(r["last_progress_at"], now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def culprit(reports: dict[int, dict]) -> int:
    """The rank at the end of the chain of waits: rank 2 waits for rank 1's activation, rank 1
    waits for nobody, so rank 1 is where the pipeline stopped. Without waits (a collective, not
    a pipeline receive), or in a cycle, the rank whose last progress is oldest."""
    oldest = min(reports.values(), key=lambda r: r["last_progress_at"])["rank"]
    waiting = [r for r in reports.values() if r.get("waits_on") is not None]
    if not waiting:
        return oldest
    rank, seen = waiting[0]["rank"], set()
    while rank in reports and reports[rank].get("waits_on") is not None and rank not in seen:
        seen.add(rank)
        rank = reports[rank]["waits_on"]
    return oldest if rank in seen else rank


def stalled_first(reports: dict[int, dict], world_size: int) -> str | None:
    """One phrase naming the rank that stopped making progress first. A rank that wrote nothing
    while its peers did was stopped or killed: it comes first."""
    if not reports:
        return None
    missing = [r for r in range(world_size) if r not in reports]
    if missing:
        return f"rank {missing[0]} wrote no report (stopped or killed) while its peers waited"
    r = reports[culprit(reports)]
    stage = f" (stage {r['stage']})" if r.get("stage") is not None else ""
    return f"rank {r['rank']}{stage} on {r['node']} stopped making progress, at step {r['step']}: {r['action']}"


def verdict(
    message: str, reports: dict[int, dict], world_size: int, first_stalled: str | None = None
) -> tuple[str, str | None]:
    """The failure line and the table to show above it (or None). A rank that raised is told by its
    own error (``message``, from blame), without a "no progress" table: its peers were only waiting
    for it; so is a rank a signal killed (blame names the signal), unless a stall was seen first.
    Otherwise the rank that stopped first leads; ``first_stalled`` (the phrase of the first
    table shown while the job ran) wins over the reports at the end, because a stopped rank that is
    woken (Slurm's SIGCONT as the step ends) writes a fresh report and would hide behind its peers."""
    if not reports or raised(reports):
        return message, None
    if KILLED.search(message) and first_stalled is None:  # a death is told as one; a stall seen before it leads
        return message, None
    stalled = first_stalled or stalled_first(reports, world_size)
    return f"{stalled}; {message}", table(reports, world_size)


class HangWatch:
    """Prints the table once when the watchdog's reports first appear while the job still runs
    (it fires at --hang-timeout, before the collective timeout ends the job) and remembers whom it
    named. Reports older than ``since`` (a previous attempt's), a rank's crash and a peer's error
    about it (a rank killed) are not a hang: only the watchdog's own reports are."""

    def __init__(self, run_dir: str, world_size: int, say=print, since: float | None = None) -> None:
        self.run_dir, self.world_size, self.say, self.since = run_dir, world_size, say, since
        self.shown = 0
        self.checked = 0.0
        self.first_stalled: str | None = None

    def new_attempt(self) -> None:
        """The job was requeued: what the ended attempt's ranks reported is no longer news."""
        self.since, self.shown, self.first_stalled = time.time(), 0, None

    def tick(self) -> None:
        if time.time() - self.checked < 2.0:
            return
        self.checked = time.time()
        reports = read_reports(self.run_dir, self.since)
        watchdog = any(r.get("reason", "").startswith(WATCHDOG) for r in reports.values())
        if watchdog and len(reports) > self.shown and not raised(reports):  # a lost peer's error is no stall
            self.shown = len(reports)
            if self.first_stalled is None:
                self.first_stalled = stalled_first(reports, self.world_size)
            self.say(f"no progress: what each rank is doing (reports in {self.run_dir}/hang/)")
            self.say(table(reports, self.world_size))
