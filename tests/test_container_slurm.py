"""Real containers through a real Slurm: every task of README's quick start runs inside the CPU
image (podman), and images that disagree with the host are refused before anything is queued."""

from __future__ import annotations

import json
import time

import pytest

import container_image
import slurm_cluster
from helpers import run_submit

IMAGE = container_image.IMAGE
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(not slurm_cluster.available(), reason=slurm_cluster.MISSING_REASON),
    pytest.mark.skipif(not container_image.available(), reason=container_image.MISSING_REASON),
]


@pytest.fixture(scope="module")
def image():
    t = time.time()
    why = container_image.build()
    if why:
        pytest.skip(why)
    print(f"image {IMAGE} ready in {time.time() - t:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield cluster
    cluster.stop()


def submit(slurm, tmp_path, *args, timeout=600):
    env = container_image.environ(slurm.environ())
    return run_submit("--cluster", "slurm", *args, cwd=tmp_path, timeout=timeout, env=env)


def test_quick_start_runs_every_task_inside_the_image_and_passes_the_check(image, slurm, tmp_path):
    out = tmp_path / "run"
    p = submit(
        slurm, tmp_path, "--strategy", "pp", "--gpus", "3", "--check", "--container", f"podman:{image}", "--out", out
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "check PASSED" in p.stdout
    r = json.loads((out / "result.json").read_text())
    assert r["check"]["passed"] and r["world_size"] == 3
    c = r["container"]
    assert c["engine"] == "podman" and c["image"] == image and c["image_id"]
    assert c["torch"] == r["torch_version"] and c["python"].startswith("3.")  # what ran inside the image
    inspect = container_image.podman("image", "inspect", "--format", "{{.Id}}", image)
    assert inspect.stdout.strip().startswith(c["image_id"])
    script = next((out / "submitit").glob("*_submission.sh")).read_text()
    assert "podman run --rm --pull=never --net=host --ipc=host --env-host" in script
    print(f"quick start in {image} through Slurm: {p.seconds:.0f} s")


def _refused(slurm, tmp_path, container: str) -> str:
    out = tmp_path / "run"
    p = submit(slurm, tmp_path, "--strategy", "pp", "--gpus", "2", "--container", container, "--out", out, timeout=180)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert not out.exists()
    queue = slurm_cluster.subprocess.run(["squeue", "-h"], env=slurm.environ(), capture_output=True, text=True)
    assert queue.stdout.strip() == ""  # nothing queued
    print(f"{container}: {p.seconds:.1f} s: {err[0]}")
    return err[0]


SITE = "/usr/local/lib/python3.11/dist-packages"


def test_an_image_with_another_submitit_is_refused(image, slurm, tmp_path):
    tag = container_image.derived(
        "model-parallel-suite:other-submitit",
        f"sed -i 's/^Version: .*/Version: 1.4.0/' {SITE}/submitit-*.dist-info/METADATA",
    )
    line = _refused(slurm, tmp_path, f"podman:{tag}")
    assert "has submitit 1.4.0, this host 1." in line


def test_an_image_whose_torch_is_below_the_floor_is_refused(image, slurm, tmp_path):
    tag = container_image.derived(
        "model-parallel-suite:old-torch", f"sed -i 's/^Version: .*/Version: 2.5.0/' {SITE}/torch-*.dist-info/METADATA"
    )
    assert "has torch 2.5.0, the project needs torch>=2.8" in _refused(slurm, tmp_path, f"podman:{tag}")


def test_a_missing_image_is_refused(image, slurm, tmp_path):
    assert "no such image in podman" in _refused(slurm, tmp_path, "podman:model-parallel-suite:absent")


@pytest.mark.slow
def test_tp_2_inside_the_image(image, slurm, tmp_path):
    out = tmp_path / "tp"
    args = ["--strategy", "tp", "--gpus", "2", "--model", "gpt", "--steps", "3", "--check", "--out", out]
    p = submit(slurm, tmp_path, *args, "--container", f"podman:{image}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["check"]["passed"] and r["world_size"] == 2 and r["container"]["image"] == image


@pytest.mark.slow
def test_a_checkpoint_written_on_the_host_resumes_inside_the_image(image, slurm, tmp_path):
    """Checkpoints are plain torch files: the host's torch writes, the image's (another release) reads."""
    common = ["--strategy", "pp", "--gpus", "2", "--model", "gpt", "--batch-size", "16"]
    straight = tmp_path / "straight"
    p = run_submit("--cluster", "local", *common, "--steps", "8", "--out", straight, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "moved"
    p = run_submit("--cluster", "local", *common, "--steps", "4", "--checkpoint-every", "4", "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = submit(slurm, tmp_path, "--resume", out, "--steps", "8", "--container", f"podman:{image}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["container"]["image"] == image and len(r["losses"]) == 8
    a = json.loads((straight / "result.json").read_text())["losses"]
    assert r["losses"] == pytest.approx(a, rel=1e-5)  # torch 2.14 on the host, 2.13 in the image
