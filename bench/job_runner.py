"""The one way the benchmarks run a job: the submit command's local executor, result.json back.

Each run is a real job (one process per GPU or gloo process, as a user's would be), quiet, with
progress lines off; a failed run returns its exit code and no result, so a table row can say so.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from core.check.metrics import read_result  # noqa: E402
from core.config import RunConfig  # noqa: E402
from jobs.submit import run_one  # noqa: E402


def run_job(out: str, **options) -> tuple[int, dict | None]:
    """Run one job with ``options`` (RunConfig fields) into the run folder ``out``: (exit code,
    its result.json, or None when it failed). Local executor and no progress lines unless given."""
    cfg = RunConfig(**{"cluster": "local", "log_every": 10**9, **options, "out": out})
    rc, folder = run_one(cfg, quiet=True)
    return rc, (read_result(folder) if rc == 0 else None)


def pick(result: dict, keys: tuple[str, ...]) -> dict:
    """The entries of ``result`` named in ``keys`` that it holds (not None)."""
    return {k: result[k] for k in keys if result.get(k) is not None}
