"""The submit command: bad input gets one line and exit 2 with nothing started; good input runs."""

from __future__ import annotations

import json
import os
import sys

import pytest

from jobs.submit import main

from helpers import run_submit, small_checkpoint

BAD = {
    "gpus zero": (["--gpus", "0"], "--gpus must be at least 1"),
    "gpus negative": (["--gpus", "-2"], "--gpus must be at least 1"),
    "more gpus than blocks": (["--gpus", "7"], "has only 6 blocks"),
    "unknown strategy": (["--strategy", "fsdp"], "unknown --strategy"),
    "unknown model": (["--model", "resnet"], "unknown --model"),
    "unknown dataset": (["--dataset", "cifar"], "unknown --dataset"),
    "unknown flavor": (["--model", "gpt", "--flavor", "huge"], "unknown --flavor"),
    "split wrong sum": (["--gpus", "3", "--split", "2,1,2"], "sums to 5"),
    "split with zero": (["--gpus", "3", "--split", "3,0,3"], "holds a zero"),
    "split not numbers": (["--gpus", "3", "--split", "a,b"], "--split takes blocks per stage"),
    "batch size zero": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "epochs with steps": (["--epochs", "1", "--steps", "3"], "give --epochs or --steps, not both"),
    "check tol not a number": (["--check", "--check-tol", "tight"], "--check-tol must be a number"),
    "reference on several gpus": (["--strategy", "reference", "--gpus", "2"], "reference runs on one device"),
    "nodes on local": (["--cluster", "local", "--strategy", "pp", "--nodes", "2", "--gpus", "2"], "needs Slurm"),
    "nodes more than processes": (["--nodes", "2", "--gpus", "2"], "does not divide the layout's 1 process"),
    "pp unknown schedule": (["--strategy", "pp", "--gpus", "2", "--schedule", "fast"], "unknown --schedule"),
    "pp batch not divisible": (["--strategy", "pp", "--gpus", "2", "--microbatches", "5"], "does not split into 5"),
    "pp too few microbatches": (
        ["--strategy", "pp", "--gpus", "4", "--model", "gpt", "--microbatches", "2"],
        "needs at least 4 micro-batches",
    ),
    "pp interleaved too many stages": (
        ["--strategy", "pp", "--gpus", "4", "--model", "gpt", "--schedule", "interleaved-1f1b"],
        "gives 8 stages per replica",
    ),
    "pp split wrong length": (
        ["--strategy", "pp", "--gpus", "2", "--split", "3,3", "--schedule", "interleaved-1f1b"],
        "--split 3,3 gives 2 stages, but the layout has 4",
    ),
    # data parallel (the layout's checks)
    "dp zero": (["--strategy", "dp", "--gpus", "2", "--dp", "0"], "--dp must be at least 1"),
    "dp negative": (["--strategy", "pp", "--gpus", "2", "--dp", "-2"], "--dp must be at least 1"),
    "dp not dividing gpus": (["--strategy", "pp", "--gpus", "6", "--dp", "4"], "must be a multiple of --dp 4"),
    "dp x tp not dividing gpus": (
        ["--strategy", "pp", "--gpus", "4", "--dp", "2", "--tp", "4", "--model", "gpt"],
        "multiple of --dp 2 x --tp 4 = 8",
    ),
    "tp not the replica's share": (
        ["--strategy", "tp", "--gpus", "4", "--dp", "2", "--tp", "4", "--model", "gpt"],
        "--gpus / --dp = 2 ranks",
    ),
    "dp strategy with fewer replicas": (["--strategy", "dp", "--gpus", "4", "--dp", "2"], "must equal --gpus 4"),
    "batch not divisible by dp": (
        ["--strategy", "dp", "--gpus", "3", "--batch-size", "16"],
        "does not split into 3 equal data-parallel shards",
    ),
    "replica batch not divisible by micro-batches": (
        ["--strategy", "pp", "--gpus", "4", "--dp", "2", "--model", "gpt", "--batch-size", "8", "--microbatches", "3"],
        "each of --dp 2 replicas takes 4",
    ),
    "nodes not dividing the processes": (
        ["--strategy", "dp", "--gpus", "4", "--nodes", "3", "--cluster", "slurm"],
        "--nodes 3 does not divide the layout's 4",
    ),
    "nodes splitting a tensor group": (
        ["--strategy", "tp", "--gpus", "4", "--dp", "2", "--model", "gpt", "--nodes", "4", "--cluster", "slurm"],
        "would split tensor groups of 2 across nodes",
    ),
    "ddp with tensor parallel": (
        ["--strategy", "tp", "--gpus", "4", "--dp", "2", "--model", "gpt", "--dp-mode", "ddp"],
        "--dp-mode ddp cannot hold tensor-parallel",
    ),
    "fsdp with mp replicas": (
        ["--strategy", "mp", "--gpus", "4", "--dp", "2", "--dp-mode", "fsdp"],
        "use --dp-mode ddp",
    ),
    # checkpoints
    "keep checkpoints zero": (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
    "max retries negative": (["--max-retries", "-1"], "--max-retries must be 0 or more"),
    "init from a missing file": (["--init-from", "/nonexistent/w.pt"], "is not a file"),
    "unknown dp mode": (["--strategy", "dp", "--gpus", "2", "--dp-mode", "zero3"], "unknown --dp-mode"),
    "tp zero": (["--strategy", "tp", "--gpus", "2", "--tp", "0", "--model", "gpt"], "--tp must be at least 1"),
    "dist timeout zero": (["--dist-timeout", "0"], "--dist-timeout must be a positive number"),
    "dist timeout negative": (["--dist-timeout", "-1"], "--dist-timeout must be a positive number"),
    "dist timeout nan": (["--dist-timeout", "nan"], "--dist-timeout must be a positive number"),
    "data dir empty": (["--data-dir", ""], "--data-dir is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_started(case, tmp_path, capsys):
    args, expected = BAD[case]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        sys.exit(
            main(
                args + ["--cluster", "local", "--device", "cpu", "--out", str(out)]
                if "--cluster" not in args
                else args + ["--device", "cpu", "--out", str(out)]
            )
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not out.exists()  # nothing submitted, no folder made


def test_device_cuda_without_cuda_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert main(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_more_gpus_than_the_host_has_is_refused(tmp_path, capsys):
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        pytest.skip("needs a CUDA host to ask for more GPUs than it has (CPU hosts use gloo processes)")
    assert main(["--gpus", str(n + 1), "--cluster", "local", "--model", "delay", "--out", str(tmp_path / "r")]) == 2


def test_data_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--data-dir", str(f), "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_data_dir_not_writable_is_refused(tmp_path, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if os.access(d, os.W_OK):  # root ignores permission bits: use a path under /proc instead
        d = "/proc/1/mnist"
    assert main(["--data-dir", str(d), "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_existing_result_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "result.json").write_text("{}")
    assert main(["--device", "cpu", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "result.json").read_text() == "{}"


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            ["--strategy", "mp", "--gpus", "3", "--cluster", "local", "--device", "cpu", "--dry-run", "--out", str(out)]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "dry run" in text and "1 process(es)" in text
    assert not out.exists()


def test_mp_job_through_submitit_writes_result_with_passed_check(tmp_path):
    """The issue's command, shortened: a real submitit local job, as a user runs it."""
    out = tmp_path / "run"
    p = run_submit(
        "--strategy",
        "mp",
        "--gpus",
        3,
        "--check",
        "--steps",
        5,
        "--cluster",
        "local",
        "--data-dir",
        tmp_path / "data",
        "--out",
        out,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check PASSED" in p.stdout and "eval accuracy" in p.stdout
    r = json.loads((out / "result.json").read_text())
    for key in (
        "strategy",
        "model",
        "dataset",
        "world_size",
        "nodes",
        "device",
        "config",
        "steps",
        "losses",
        "final_loss",
        "eval_accuracy",
        "samples_per_sec",
        "peak_memory_bytes",
        "check",
    ):
        assert key in r, key
    assert r["strategy"] == "mp" and r["steps"] == 5 and len(r["losses"]) == 5
    assert r["check"]["passed"] and r["check"]["max_grad_rel_diff"] == 0.0
    assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_samples"] == 1000
    assert r["config"]["gpus"] == 3 and len(r["peak_memory_bytes"]) == 1


def test_a_failing_rank_is_reported_in_one_line(tmp_path):
    """A job whose task raises ends with exit 1 and that task's own exception, not a traceback."""
    out = tmp_path / "run"
    # what the submitting host can see is refused before submission; a rank that raises in the job
    # is the test-only injected fault (core/training/faults.py)
    p = run_submit(
        "--strategy",
        "pp",
        "--gpus",
        2,
        "--model",
        "delay",
        "--steps",
        2,
        "--cluster",
        "local",
        "--out",
        out,
        cwd=tmp_path,
        env=dict(os.environ, MPS_FAULT="crash:rank=0:step=1"),
    )
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "InjectedFaultError" in err[0] and "rank 0" in err[0], p.stderr
    assert "stopped making progress" not in p.stdout + p.stderr  # a crash, not a hang


def test_resume_takes_layout_flags_and_refuses_another_model(tmp_path, capsys):
    """A checkpoint is layout-free: --dp/--gpus/--strategy override the saved ones; what would change
    the training itself (another model, batch or seed) is refused in one line, nothing started."""
    from core.config import RunConfig

    run = tmp_path / "run"
    small_checkpoint(run, 3)
    (run / "config.json").write_text(json.dumps(RunConfig(strategy="pp", gpus=2, model="gpt").to_dict()))
    local = ["--cluster", "local", "--device", "cpu", "--dry-run"]
    assert main(["--resume", str(run), "--strategy", "pp", "--gpus", "4", "--dp", "2", *local]) == 0
    out = capsys.readouterr().out
    assert "layout: pp, dp 2 x pp 2" in out
    assert "resume: applying --cluster local, --device cpu, --dp 2, --gpus 4, --strategy pp" in out  # all said
    assert main(["--resume", str(run), "--out", str(tmp_path / "elsewhere"), *local]) == 2
    assert "continues in its own folder: drop --out" in capsys.readouterr().err
    for flags, said in (
        (["--model", "mnist-cnn"], "--model mnist-cnn differs from the saved run's gpt"),
        (["--batch-size", "16"], "--batch-size 16 differs"),
    ):
        assert main(["--resume", str(run), *flags, *local]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    # a finished run continues only when asked for more steps
    (run / "result.json").write_text("{}")
    assert main(["--resume", str(run), *local]) == 2
    assert "finished at step 3; add --steps N with N > 3" in capsys.readouterr().err
    assert main(["--resume", str(run), "--steps", "6", *local]) == 0


def test_resume_without_a_checkpoint_and_checkpoint_every_zero_are_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--resume", str(tmp_path), "--dry-run"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    assert main(["--checkpoint-every", "0", "--dry-run", "--cluster", "local"]) == 2
    assert "--checkpoint-every must be at least 1" in capsys.readouterr().err


# ---- refused before anything starts, nothing created ---------------------------------------
SHARED_MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


def _mnist_copy(tmp_path, truncate: str | None = None):
    """A data folder holding the shared real test split, also as the training split (no download
    is ever attempted: both splits are there), optionally with one file cut short."""
    import shutil

    raw_in = os.path.join(SHARED_MNIST, "MNIST", "raw")
    if not os.path.isdir(raw_in):
        pytest.skip("needs ../shared/data (the MNIST test split), which a fresh clone has not")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        src = os.path.join(raw_in, f"t10k-{kind}-ubyte.gz")
        for split in ("train", "t10k"):
            shutil.copy(src, raw / f"{split}-{kind}-ubyte.gz")
    if truncate:
        target = raw / truncate
        target.write_bytes(target.read_bytes()[:5000])
    return tmp_path / "data"


def _refused(args, tmp_path, capsys) -> str:
    before = set(os.listdir(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert set(os.listdir(tmp_path)) == before  # nothing created
    return err[0]


def test_a_truncated_mnist_file_is_named_with_the_fix(tmp_path, capsys):
    data = _mnist_copy(tmp_path, truncate="train-images-idx3-ubyte.gz")
    line = _refused(["--data-dir", str(data), "--steps", "1", "--out", str(tmp_path / "r")], tmp_path, capsys)
    assert "train-images-idx3-ubyte.gz is damaged" in line and "delete it and run again" in line


def test_a_batch_larger_than_the_data_is_refused_before_the_ranks_start(tmp_path, capsys):
    data = _mnist_copy(tmp_path)
    args = ["--data-dir", str(data), "--batch-size", "20000", "--steps", "1", "--out", str(tmp_path / "r")]
    assert "is more than the 10,000 training samples" in _refused(args, tmp_path, capsys)


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    line = _refused(["--model", "delay", "--out", "/proc/no-such-run"], tmp_path, capsys)
    assert "--out /proc/no-such-run" in line


def test_compare_with_gpus_zero_is_one_line(tmp_path, capsys):
    assert "--gpus must be at least 1" in _refused(["--compare", "--gpus", "0", "--model", "delay"], tmp_path, capsys)


def test_dry_run_creates_nothing_and_says_when_cpus_are_oversubscribed(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    data = tmp_path / "never-made"
    argv = ["--dry-run", "--strategy", "dp", "--gpus", str(cores + 1), "--batch-size", str(cores + 1)]
    assert main(argv + ["--model", "delay", "--cluster", "local", "--device", "cpu", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "oversubscribed" in out
    assert main(["--dry-run", "--data-dir", str(data), "--cluster", "local", "--device", "cpu"]) == 0
    assert os.listdir(tmp_path) == []  # neither the data folder nor a run folder


def test_the_time_limit_signal_lead_follows_time(tmp_path, capsys):
    """A fixed USR2@120 on a 2-minute job arrives before the job starts; the lead is a quarter."""
    base = ["--dry-run", "--cluster", "slurm", "--model", "delay", "--out", str(tmp_path / "r")]
    assert main(base + ["--time", "2"]) == 0
    assert "#SBATCH --signal=USR2@30" in capsys.readouterr().out
    assert main(base + ["--time", "60"]) == 0
    assert "#SBATCH --signal=USR2@120" in capsys.readouterr().out


def test_side_jobs_preview_refuse_bad_input_and_run_through_the_one_watcher(tmp_path, capsys):
    """--pytest and --validate share training's way in (jobs.cli.side_job): a --dry-run preview that
    creates nothing, one line for bad input, and a real job waited for by the one watcher."""
    local = ["--cluster", "local", "--device", "cpu"]
    for extra in (["--pytest", "gpu"], ["--validate", "--gpus", "2"]):
        out = tmp_path / extra[0].strip("-")
        assert main(extra + local + ["--dry-run", "--out", str(out)]) == 0, extra
        assert "dry run: would submit to local" in capsys.readouterr().out and not out.exists(), extra
    assert main(["--pytest", "gpu; rm -rf ~"] + local) == 2
    assert "--pytest takes a marker expression" in capsys.readouterr().err
    # a marker that selects nothing: the suite is collected inside the job, pytest's own exit code 5 comes back
    p = run_submit("--pytest", "gpu and not gpu", *local, "--out", tmp_path / "pt", cwd=tmp_path)
    assert p.returncode == 5 and "deselected" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
