"""Container recipes and the generated sbatch lines, checked as text; the image probe's refusals
against a stand-in engine (a script answering as podman would). tests/test_container_slurm.py runs
real containers."""

from __future__ import annotations

import os
import re

import pytest

from jobs.plan.containers import TORCH_FLOOR, version_tuple
from jobs.submit import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def recipe(path: str) -> str:
    return open(os.path.join(ROOT, "containers", path)).read()


def base_tag(path: str) -> str:
    return re.search(r"^(?:FROM|From:)\s*(\S+)", recipe(path), re.M).group(1)


def torch_pin(path: str) -> str:
    return re.search(r'"torch==([^"]+)"', recipe(path)).group(1)


def pyproject_torch_floor() -> tuple[int, ...]:
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    return version_tuple(re.search(r'"torch>=([\d.]+)"', text).group(1))


def test_gpu_recipes_share_one_base_and_one_torch_pin():
    assert base_tag("Dockerfile") == base_tag("mps.def")
    assert torch_pin("Dockerfile") == torch_pin("mps.def")


@pytest.mark.parametrize("path", ["Dockerfile", "mps.def", "Containerfile.cpu"])
def test_every_recipe_pins_a_torch_that_meets_pyprojects_floor(path):
    """An image below the floor would build and then fail in the job (the project is installed
    --no-deps, so pip never checks): the pin is compared here instead."""
    assert version_tuple(torch_pin(path)) >= pyproject_torch_floor(), f"{path} pins torch {torch_pin(path)}"


def test_the_probes_floor_is_pyprojects():
    assert TORCH_FLOOR == pyproject_torch_floor()[: len(TORCH_FLOOR)]


def test_versions_compare_as_numbers():
    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("2.8.0a0+5228986") == (2, 8, 0)
    assert version_tuple("2.10.1") > version_tuple("2.9.1") and version_tuple("2.7.1") < TORCH_FLOOR


def normalise(script: str, tmp: str) -> str:
    """Replace the paths that differ per machine by names, so the script compares as text."""
    import sys

    script = script.replace(tmp, "<TMP>").replace(ROOT, "<REPO>").replace(sys.executable, "<PYTHON>")
    return re.sub(r"runs/[^\s/]+", "runs/<RUN>", script)


CONTAINERS = {"pyxis": "pyxis:nvcr.io/nvidia/pytorch:25.08-py3", "podman": "podman:mps:gpu", "docker": "docker:mps:gpu"}


@pytest.mark.parametrize("kind", ["sif", "pyxis", "podman", "docker"])
def test_dry_run_prints_the_complete_sbatch_script_with_the_container_line(kind, tmp_path, capsys):
    image = tmp_path / "mps.sif"
    image.write_text("")
    container = str(image) if kind == "sif" else CONTAINERS[kind]
    code = main(
        [
            "--strategy",
            "pp",
            "--gpus",
            "4",
            "--nodes",
            "2",
            "--model",
            "delay",
            "--cluster",
            "slurm",
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--qos",
            "high",
            "--constraint",
            "h100",
            "--time",
            "90",
            "--cpus-per-task",
            "8",
            "--mem",
            "64G",
            "--slurm-opt",
            "exclusive=true",
            "--container",
            container,
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--dry-run",
        ]
    )
    assert code == 0
    text = normalise(capsys.readouterr().out, str(tmp_path))
    script = text[text.index("#!/bin/bash") :]
    golden = os.path.join(GOLDEN, f"sbatch_{kind}.txt")
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        open(golden, "w").write(script)
    assert script == open(golden).read()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--partition", "gpu;rm -rf ~"),
        ("--account", "$(whoami)"),
        ("--qos", "`id`"),
        ("--constraint", "a\nb"),
        ("--slurm-opt", "x=1;y"),
    ],
)
def test_values_that_could_inject_shell_are_refused(flag, value, tmp_path, capsys):
    assert main(["--cluster", "slurm", flag, value, "--out", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shell syntax" in err[0]


def test_container_needs_slurm_and_an_existing_image(tmp_path, capsys):
    assert main(["--cluster", "local", "--container", str(tmp_path / "x.sif"), "--out", str(tmp_path / "r")]) == 2
    assert "--container runs tasks under Slurm" in capsys.readouterr().err
    assert main(["--cluster", "slurm", "--container", str(tmp_path / "x.sif"), "--out", str(tmp_path / "r")]) == 2
    assert "is not a file" in capsys.readouterr().err


FAKE_ENGINE = """#!/bin/sh
# answers as podman would: image inspect prints an id, run prints the probe's JSON line
case "$1" in
  image) [ "$5" = "mps:absent" ] && {{ echo "Error: image not known" >&2; exit 125; }}; echo sha256:0123abcdef ;;
  run) echo '{{"python": "{python}", "submitit": "{submitit}", "torch": "{torch}"}}' ;;
esac
"""


def fake_podman(tmp_path, monkeypatch, python=None, submitit_version=None, torch="2.13.0+cpu") -> None:
    import sys

    import submitit

    python = python or ".".join(map(str, sys.version_info[:3]))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "podman"
    exe.write_text(FAKE_ENGINE.format(python=python, submitit=submitit_version or submitit.__version__, torch=torch))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


MISMATCHES = {
    "python": (dict(python="3.9.2"), "runs Python 3.9.2, this host 3."),
    "submitit": (dict(submitit_version="1.4.0"), "has submitit 1.4.0, this host "),
    "torch": (dict(torch="2.5.0a0+e000cf0"), "has torch 2.5.0a0+e000cf0, the project needs torch>=2.8"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_an_image_that_disagrees_with_the_host_is_refused_in_one_line(case, tmp_path, monkeypatch, capsys):
    """The same refusals as tests/test_container_slurm.py makes with real images, in every run."""
    kw, words = MISMATCHES[case]
    fake_podman(tmp_path, monkeypatch, **kw)
    out = tmp_path / "run"
    assert main(["--cluster", "slurm", "--container", "podman:mps:cpu", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_a_missing_image_or_engine_is_one_line(tmp_path, monkeypatch, capsys):
    fake_podman(tmp_path, monkeypatch)
    args = ["--cluster", "slurm", "--steps", "1", "--out", str(tmp_path / "run")]
    assert main([*args, "--container", "podman:mps:absent"]) == 2
    assert "no such image in podman on this host" in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main([*args, "--container", "docker:mps:cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "docker is not installed on this host" in err[0], err
    assert not (tmp_path / "run").exists()
