"""The CPU image the container tests run in (containers/build.sh cpu), built once per machine and
reused while its recipe is unchanged; skipped with the reason where it cannot be built here."""

from __future__ import annotations

import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "model-parallel-suite:cpu"
CONF = os.path.join(ROOT, "containers", "containers.conf")
MISSING_REASON = "podman, runc and debootstrap (as root) are needed: apt-get install podman runc debootstrap uidmap"


def available() -> bool:
    return all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in ("podman", "runc", "debootstrap")) and (
        os.geteuid() == 0
    )


def environ(env: dict | None = None) -> dict:
    """This sandbox refuses setrlimit: podman needs containers/containers.conf (its header says why)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("CONTAINERS_CONF", CONF)
    return env


def build(timeout_s: float = 1200) -> str | None:
    """Build (or reuse) the image; None when it is there, else why it could not be built."""
    try:
        p = subprocess.run(
            [os.path.join(ROOT, "containers", "build.sh"), "cpu"],
            env=environ(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return f"containers/build.sh cpu took over {timeout_s:.0f} s"
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        return f"containers/build.sh cpu failed (no network for debootstrap or pip?): {last}"
    print(p.stdout.strip().splitlines()[-1])
    return None


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=environ(), capture_output=True, text=True, timeout=timeout)


def derived(tag: str, shell: str) -> str:
    """An image made from the CPU image by one shell command (e.g. another version in a package's
    metadata), committed as ``tag``."""
    name = f"mps-derive-{os.getpid()}"
    podman("rm", "-f", name)
    p = podman("run", "--name", name, "--net=none", IMAGE, "sh", "-c", shell)
    assert p.returncode == 0, p.stderr
    assert podman("commit", "-q", name, tag).returncode == 0
    podman("rm", "-f", name)
    return tag
