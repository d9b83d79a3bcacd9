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

from core.training.progress import watchdog_period_s
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


def report_grace_s(reports: dict[int, dict]) -> float:
    """How long after its peers a live rank's watchdog may still report: each rank's watchdog fires
    --hang-timeout after its OWN last progress and looks only every watchdog period, so two live
    ranks' reports can land that far apart (twice: both ends of the period), plus a margin."""
    timeout = max(((r.get("hang_timeout_s") or 20.0) for r in reports.values()), default=20.0)
    return 2 * watchdog_period_s(timeout) + 2.0


class HangWatch:
    """Prints the table once when the watchdog's reports first appear while the job still runs
    (it fires at --hang-timeout, before the collective timeout ends the job) and remembers whom it
    named. Reports older than ``since`` (a previous attempt's), a rank's crash and a peer's error
    about it (a rank killed) are not a hang: only the watchdog's own reports are.

    A rank without a report is named as stopped or killed only once it has stayed silent for
    report_grace_s() after the watcher first saw its peers' reports: a live rank's watchdog can
    simply fire a little later than its peers' (the watcher may look in between)."""

    def __init__(self, run_dir: str, world_size: int, say=print, since: float | None = None) -> None:
        self.run_dir, self.world_size, self.say, self.since = run_dir, world_size, say, since
        self.shown = 0
        self.checked = 0.0
        self.first_stalled: str | None = None
        self.missing_since: dict[int, float] = {}  # rank -> when the watcher saw its peers report without it

    def new_attempt(self) -> None:
        """The job was requeued: what the ended attempt's ranks reported is no longer news."""
        self.since, self.shown, self.first_stalled, self.missing_since = time.time(), 0, None, {}

    def decide(self, reports: dict[int, dict], now: float) -> str | None:
        """The phrase naming the rank that stopped first, or None while that cannot be told yet.
        A rank that wrote nothing for the grace while its peers had reported comes first (a SIGSTOP:
        when Slurm's SIGCONT wakes it at the step's end its fresh report comes far too late to count)."""
        grace = report_grace_s(reports)
        for rank, since in sorted(self.missing_since.items()):
            wrote_at = reports[rank]["reported_at"] if rank in reports else now
            if wrote_at - since >= grace:
                return f"rank {rank} wrote no report (stopped or killed) while its peers waited"
        return stalled_first(reports, self.world_size) if len(reports) == self.world_size else None

    def at_end(self, reports: dict[int, dict]) -> str | None:
        """The phrase to lead the verdict with once the job ended (None if no stall was seen)."""
        if self.first_stalled is None and self.shown:
            self.first_stalled = self.decide(reports, time.time())
        return self.first_stalled

    def tick(self) -> None:
        if time.time() - self.checked < 2.0:
            return
        now = self.checked = time.time()
        reports = read_reports(self.run_dir, self.since)
        watchdog = any(r.get("reason", "").startswith(WATCHDOG) for r in reports.values())
        if not watchdog or raised(reports):  # a lost peer's error is no stall
            return
        for rank in range(self.world_size):
            if rank not in reports:
                self.missing_since.setdefault(rank, now)
        if self.first_stalled is None:
            self.first_stalled = self.decide(reports, now)
        if len(reports) > self.shown:
            self.shown = len(reports)
            self.say(f"no progress: what each rank is doing (reports in {self.run_dir}/hang/)")
            self.say(table(reports, self.world_size))
