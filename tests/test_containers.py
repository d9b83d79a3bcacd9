"""Containers and the generated sbatch script (no runtime can run here: checked as text)."""

from __future__ import annotations

import os
import re

import pytest

from jobs.submit import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def base_tag(path: str) -> str:
    text = open(os.path.join(ROOT, "containers", path)).read()
    return re.search(r"^(?:FROM|From:)\s*(\S+)", text, re.M).group(1)


def test_dockerfile_and_apptainer_definition_share_one_pinned_base():
    assert base_tag("Dockerfile") == base_tag("mps.def")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base_tag("Dockerfile"))


def normalise(script: str, tmp: str) -> str:
    """Replace the paths that differ per machine by names, so the script compares as text."""
    import sys

    script = script.replace(tmp, "<TMP>").replace(ROOT, "<REPO>").replace(sys.executable, "<PYTHON>")
    return re.sub(r"runs/[^\s/]+", "runs/<RUN>", script)


@pytest.mark.parametrize("kind", ["sif", "pyxis"])
def test_dry_run_prints_the_complete_sbatch_script_with_the_container_line(kind, tmp_path, capsys):
    image = tmp_path / "mps.sif"
    image.write_text("")
    container = str(image) if kind == "sif" else "pyxis:nvcr.io/nvidia/pytorch:24.10-py3"
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
