"""--container: which engine runs each task's image, and the probe that checks an image agrees with
the submitting host before anything is queued.

The job's pickles cross between host and image (submitit's cloudpickle): the Python minor version
and submitit's version must be the same on both, and the image's torch must meet the project's
floor. A Docker-compatible image (podman:IMAGE, docker:IMAGE) is asked once, at submission, in a
few seconds; a .sif or a pyxis image cannot be run from a login node without its runtime, so only
its existence is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import submitit

from core.config import ConfigError

ENGINES = ("podman", "docker")
"""Docker-compatible engines: each Slurm task starts its own container (`ENGINE run ...`)."""
TORCH_FLOOR = (2, 8)
"""pyproject's torch>=2.8 (tests/test_containers.py keeps the two equal)."""
PROBE_TIMEOUT_S = 120
# importlib.metadata rather than `import torch`: the versions without loading torch (seconds saved)
PROBE = (
    "import importlib.metadata as m, json, sys; "
    "print(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], "
    "'submitit': m.version('submitit'), 'torch': m.version('torch')}))"
)


@dataclass(frozen=True)
class Container:
    engine: str
    """apptainer, pyxis, podman or docker."""
    image: str
    """The .sif path (absolute), or the image name the engine knows."""


def parse(spec: str) -> Container:
    """podman:IMAGE, docker:IMAGE, pyxis:IMAGE, or a .sif path (Apptainer)."""
    engine, sep, image = spec.partition(":")
    if sep and engine in (*ENGINES, "pyxis"):
        if not image:
            raise ConfigError(f"--container {spec}: name the image after '{engine}:'")
        return Container(engine, image)
    return Container("apptainer", os.path.abspath(spec))


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '2.8.0a0+5228986' -> (2, 8, 0)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in m.groups()) if m else (0,)


def probe(container: Container, timeout_s: float = PROBE_TIMEOUT_S) -> dict:
    """Ask a podman/docker image for its id and its Python, submitit and torch versions; refuse a
    missing engine or image and any disagreement with this host in one line (ConfigError).
    Returns result.json's ``container`` record (less what the job itself adds)."""
    engine, image = container.engine, container.image
    exe = shutil.which(engine)
    if exe is None:
        raise ConfigError(f"--container {engine}:{image}: {engine} is not installed on this host (not on PATH)")
    inspect = _run([exe, "image", "inspect", "--format", "{{.Id}}", image], timeout_s)
    if inspect.returncode != 0:
        raise ConfigError(
            f"--container {engine}:{image}: no such image in {engine} on this host "
            f"(build it, e.g. containers/build.sh cpu, or {engine} pull it)"
        )
    image_id = inspect.stdout.strip().splitlines()[0].removeprefix("sha256:")
    # --pull=never: an image is never fetched behind the user's back; --net=none: nothing to reach
    p = _run([exe, "run", "--rm", "--pull=never", "--net=none", image, "python3", "-c", PROBE], timeout_s)
    try:
        found = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        last = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise ConfigError(
            f"--container {engine}:{image}: the image cannot report its python3, submitit and torch ({last})"
        ) from None
    host_python = ".".join(map(str, sys.version_info[:2]))
    image_python = ".".join(found["python"].split(".")[:2])
    if image_python != host_python:
        raise ConfigError(
            f"--container {engine}:{image}: the image runs Python {found['python']}, this host "
            f"{sys.version.split()[0]}: the job's pickles need the same minor version on both"
        )
    if found["submitit"] != submitit.__version__:
        raise ConfigError(
            f"--container {engine}:{image}: the image has submitit {found['submitit']}, this host "
            f"{submitit.__version__}: the job's pickles need the same version on both"
        )
    if version_tuple(found["torch"]) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ConfigError(
            f"--container {engine}:{image}: the image has torch {found['torch']}, the project needs "
            f"torch>={floor}: rebuild the image (containers/README.md)"
        )
    return {
        "engine": engine,
        "image": image,
        "image_id": image_id[:12],
        "python": found["python"],
        "torch": found["torch"],
    }


def _run(cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"--container: `{' '.join(cmd[:3])} ...` did not answer in {timeout_s:.0f} s (is {cmd[0]} working here?)"
        ) from None
