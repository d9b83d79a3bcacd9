"""A user's mistake found on the submitting host is one line, exit 2, and leaves nothing behind:
their model and dataset files, the checkpoint a resume would load, the files the command reads and
writes for them (config.json, latest.json, meta.json, --export, --init-from), --validate's thresholds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from core.errors import ConfigError
from core.files import read_json, user_file, write_json_atomic
from jobs.submit import main

from helpers import run_submit

LOCAL = ["--cluster", "local", "--device", "cpu"]


def one_line(args: list[str], capsys, tmp_path) -> str:
    """Run the command; assert exit 2, one error line, no run folder; return the line."""
    out = tmp_path / "run"
    if "--out" not in args and "--resume" not in args and "--export" not in args:
        args = [*args, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not out.exists()
    return err[0]


# ---- the user's model and dataset files ---------------------------------------------------
USER_FILES = {
    "factory raises": ("def build(flavor):\n    raise ValueError('no such width')\n", "build"),
    "factory takes no argument": ("def build():\n    return None\n", "build"),
    "syntax error": ("def build(flavor)\n    return None\n", "build"),
    "raises at import": ("raise RuntimeError('needs a licence file')\n", "build"),
    "missing dependency": ("import no_such_dependency_here\n", "build"),
}
EXPECTED = {
    "factory raises": ("the factory failed at", ":2: ValueError: no such width"),
    "factory takes no argument": ("the factory failed at", "TypeError: build() takes 0 positional arguments"),
    "syntax error": ("importing", ":1: SyntaxError"),
    "raises at import": ("importing", ":1: RuntimeError: needs a licence file"),
    "missing dependency": ("importing", "ModuleNotFoundError: No module named 'no_such_dependency_here'"),
}


@pytest.mark.parametrize("case", sorted(USER_FILES))
def test_a_model_file_that_fails_is_one_line_naming_the_file(case, tmp_path, capsys, monkeypatch):
    source, attr = USER_FILES[case]
    module = "user_" + case.replace(" ", "_")
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = one_line(["--model", f"{module}:{attr}", *LOCAL, "--steps", "1"], capsys, tmp_path)
    first, last = EXPECTED[case]
    assert f"--model {module}:{attr}: {first}" in line and last in line, line
    assert f"{module}.py" in line, line  # the file is named


def test_a_dataset_factory_that_raises_is_one_line_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    source = "def make(model, data_dir, seed, batch_size):\n    raise OSError('no bucket')\n"
    (tmp_path / "user_data.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    line = one_line(["--model", "delay", "--dataset", "user_data:make", *LOCAL, "--steps", "1"], capsys, tmp_path)
    assert "--dataset user_data:make: the factory failed at" in line and "user_data.py:2: OSError: no bucket" in line


@pytest.mark.parametrize("model", ["delay", "gpt"])
def test_a_batch_larger_than_the_train_samples_is_refused_for_every_dataset(model, tmp_path, capsys):
    line = one_line(["--model", model, "--train-samples", "4", "--batch-size", "8", *LOCAL], capsys, tmp_path)
    assert "--batch-size 8 x --grad-accum 1 is more than the 4 training samples (--train-samples 4)" in line


def test_init_from_a_file_that_is_not_torch_is_one_line(tmp_path, capsys):
    junk = tmp_path / "w.pt"
    junk.write_text("hello")  # reaches torch's legacy unpickler, which raised a KeyError
    line = one_line(["--model", "delay", "--init-from", str(junk), *LOCAL], capsys, tmp_path)
    assert f"--init-from {junk} is not a torch file of tensors" in line


def test_pp_on_one_gpu_is_refused_saying_what_to_run(tmp_path, capsys):
    line = one_line(["--strategy", "pp", "--gpus", "1", "--steps", "2", *LOCAL], capsys, tmp_path)
    assert "is a pipeline of one stage" in line and "--strategy reference --gpus 1" in line


@pytest.mark.parametrize(
    "args, said",
    [
        (["--threshold", "p2p_gbps=nan"], "--threshold p2p_gbps must be a finite number, 0 or more (got 'nan')"),
        (["--threshold", "allreduce_gbps=-1"], "must be a finite number, 0 or more (got '-1')"),
        (["--gpus", "0"], "--gpus must be at least 1 (got 0)"),
    ],
)
def test_validate_refuses_thresholds_that_switch_the_check_off(args, said, tmp_path, capsys):
    line = one_line(["--validate", *args, *LOCAL, "--dry-run"], capsys, tmp_path)
    assert said in line and "--batch-size" not in line


# ---- the files the command reads and writes -------------------------------------------------
def test_a_full_disk_and_a_damaged_json_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot write /dev/full: No space left on device"):
        with user_file("/dev/full", "write"), open("/dev/full", "w") as f:
            f.write("x" * 100_000)
    bad = tmp_path / "latest.json"
    bad.write_text('{"folder": ')
    with pytest.raises(ConfigError, match=f"{bad} is damaged"):
        read_json(str(bad))
    with pytest.raises(ConfigError, match="cannot write /proc/nope/x.json"):
        write_json_atomic("/proc/nope/x.json", {})


# ---- --resume and --export against a real run's checkpoints ---------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A delay run of 4 steps with checkpoints at steps 2 and 4 (one real job, ~20 s)."""
    out = tmp_path_factory.mktemp("ck") / "run"
    args = ("--model", "delay", "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "3", *LOCAL)
    p = run_submit(*args, "--out", out, cwd=out.parent)
    assert p.returncode == 0, p.stderr
    return str(out)


def tree(folder) -> dict[str, str]:
    """Every file under ``folder`` with its content's hash: the folder byte for byte."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def copy_of(run: str, tmp_path) -> str:
    target = str(tmp_path / "copy")
    shutil.copytree(run, target)
    return target


BREAK = {
    "latest names a missing step": lambda ck: shutil.rmtree(f"{ck}/step-00000004"),
    "a truncated shard": lambda ck: os.truncate(f"{ck}/step-00000004/__0_0.distcp", 1000),
    "a deleted shard": lambda ck: os.remove(f"{ck}/step-00000004/__0_0.distcp"),
    "a corrupt meta.json": lambda ck: open(f"{ck}/step-00000004/meta.json", "w").write("{"),
    "a corrupt latest.json": lambda ck: open(f"{ck}/latest.json", "w").write("{x"),
}


@pytest.mark.parametrize("case", sorted(BREAK))
def test_a_broken_latest_checkpoint_falls_back_to_the_newest_intact_one(case, finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    BREAK[case](os.path.join(run, "checkpoint"))
    assert main(["--resume", run, "--steps", "6", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # a damaged latest.json leaves step 4 intact: it is the newest; otherwise step 4 is what broke
    step = "step-00000004" if case == "a corrupt latest.json" else "step-00000002"
    assert "resume: the latest checkpoint is broken (" in out and f"using {step}, the newest intact one" in out


@pytest.mark.parametrize(
    "case, said",
    [
        ("every checkpoint broken", "no intact checkpoint in"),
        ("config.json damaged", "config.json is damaged or not what it should be (JSONDecodeError"),
        ("config.json of the wrong types", "config.json is not a run's configuration"),
        ("another model", "--model gpt differs from the saved run's delay"),
    ],
)
def test_a_refused_resume_changes_nothing_in_the_folder(case, said, finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    extra = []
    if case == "every checkpoint broken":
        for step in ("step-00000002", "step-00000004"):
            os.remove(f"{run}/checkpoint/{step}/__0_0.distcp")
    elif case == "config.json damaged":
        open(f"{run}/config.json", "w").write("[1,")
    elif case == "config.json of the wrong types":
        open(f"{run}/config.json", "w").write(json.dumps({"model": "delay", "gpus": "two"}))
    else:
        extra = ["--model", "gpt"]
    before = tree(run)
    line = one_line(["--resume", run, "--steps", "6", *extra, *LOCAL], capsys, tmp_path)
    assert f"--resume {run}" in line and said in line, line
    assert tree(run) == before


def test_export_refuses_a_broken_run_and_a_target_it_cannot_write(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    for target, said in (
        (str(tmp_path / "no-such-folder" / "w.pt"), "does not exist; create it first"),
        ("/proc/w.pt", "cannot write /proc/w.pt"),  # refused even for root, unlike a chmod'ed folder
    ):
        line = one_line(["--export", run, target], capsys, tmp_path)
        assert said in line, line
    open(f"{run}/checkpoint/latest.json", "w").write("{x")
    os.remove(f"{run}/checkpoint/step-00000002/meta.json")
    os.remove(f"{run}/checkpoint/step-00000004/.metadata")
    line = one_line(["--export", run, str(tmp_path / "w.pt")], capsys, tmp_path)
    assert f"--export {run}: no intact checkpoint in" in line and "latest.json is damaged" in line
    assert not (tmp_path / "w.pt").exists()
