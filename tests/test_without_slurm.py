"""A newcomer's machine has no Slurm: README's test command must still pass there.

Runs the tests that touch Slurm (the dry-run sbatch previews and the real-cluster tests) in a
child pytest whose PATH holds no srun, sbatch or sinfo: the previews must pass (a laptop previews
a script before logging in to a cluster) and the real-cluster tests must skip with their reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_COMMANDS = ("srun", "sbatch", "sinfo", "squeue", "scontrol")


def test_slurm_previews_pass_and_cluster_tests_skip_without_slurm_binaries(tmp_path):
    # PATH: this Python's folder only (a venv's bin holds no Slurm); checked, not assumed
    path = os.path.dirname(sys.executable)
    assert not any(shutil.which(c, path=path) for c in SLURM_COMMANDS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PATH"] = path
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "0",
         "tests/test_containers.py", "tests/test_slurm.py", "-k", "dry_run or slurm"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "passed" in out and "failed" not in out and "error" not in out.lower().split("short test summary")[0]
    assert "Slurm daemons not installed" in out  # the cluster tests skipped, with their reason


def test_submitting_to_slurm_without_sbatch_says_so_in_one_line(tmp_path):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    args = ["--cluster", "slurm", "--strategy", "pp", "--gpus", "2", "--model", "gpt", "--out", str(tmp_path / "r")]
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "submit.py"), *args], env=env, capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "sbatch is not on PATH" in p.stderr
    assert not (tmp_path / "r").exists()  # nothing half-done
