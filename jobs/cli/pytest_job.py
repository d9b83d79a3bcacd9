"""``--pytest MARKER``: the test suite itself as a job, to check a node before trusting it."""

from __future__ import annotations

import os
import subprocess
import sys


class PytestTask:
    def __init__(self, marker: str, root: str) -> None:
        self.marker, self.root = marker, root

    def __call__(self) -> tuple[int, str]:
        env = dict(os.environ)
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", self.marker, "-v", "-p", "no:cacheprovider"],
            cwd=self.root,
            capture_output=True,
            text=True,
            env=env,
        )
        return p.returncode, (p.stdout + p.stderr)[-20000:]
