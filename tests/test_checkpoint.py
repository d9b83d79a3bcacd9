"""Stop on SIGUSR2, checkpoint, resume: the resumed run's losses equal an uninterrupted run's exactly."""

from __future__ import annotations

import os
import signal

import pytest

from core.training import faults
from core.training.stop import PREEMPT, STOP, StopRequest
from core.training.train import Preempted, run
from jobs.plan.strategies import get_build

from helpers import cfg, one_process, small_mnist


def test_sigusr2_checkpoint_and_resume_is_bit_for_bit(tmp_path):
    data = small_mnist(2048, 64)
    # dropout ON: the RNG state must be restored too, or the masks (and losses) would differ
    c = cfg(strategy="mp", gpus=3, steps=40, batch_size=32)
    straight = run(c, one_process(c), get_build("mp"), dataset=data)

    stop = StopRequest()
    stop.install()

    def signal_at_step_10(rank: int, step: int) -> None:  # a real signal, mid-run, whatever the host's speed
        if step == 10:
            os.kill(os.getpid(), signal.SIGUSR2)

    real, faults.maybe_fail = faults.maybe_fail, signal_at_step_10
    try:
        with pytest.raises(Preempted):
            run(c, one_process(c), get_build("mp"), out_dir=str(tmp_path), dataset=data, stop=stop)
    finally:
        faults.maybe_fail = real
        stop.restore()
    assert stop.agreed_kind == PREEMPT  # USR2: the job is to be requeued, not ended
    assert (tmp_path / "checkpoint" / "latest.json").exists()
    assert not (tmp_path / "result.json").exists()
    resumed = run(c, one_process(c), get_build("mp"), out_dir=str(tmp_path), dataset=data, stop=StopRequest())
    assert resumed["losses"] == straight["losses"]  # exact, not approximately
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]


def test_sigterm_asks_for_a_stop_and_a_second_ctrl_c_ends_at_once():
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # scancel's signal: checkpoint, then end (no requeue)
        assert stop.kind == STOP and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR2)  # a preemption outranks a stop: the job comes back
        assert stop.kind == PREEMPT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---- layout-free checkpoints (torch.distributed.checkpoint) ---------------------------------
GPT = dict(
    model="gpt", batch_size=8, check=True, lr=1e-2
)  # check: dropout off; a large lr: lost AdamW moments would show
K, MORE = 3, 3  # steps before the checkpoint, steps after the resume


class Train:
    """One run inside harness ranks: train ``kw`` into ``out`` (resuming when a checkpoint is there)."""

    def __init__(self, out: str | None, **kw) -> None:
        self.out, self.kw = out, kw

    def __call__(self) -> dict:
        from helpers import train_in_rank

        r = train_in_rank(cfg(**GPT, **self.kw), out_dir=self.out)
        return {"losses": r["losses"], "check": r["check"]}


RESUME_AS = {
    "reference": (1, dict(strategy="reference")),
    "mp 3": (1, dict(strategy="mp", gpus=3)),
    "tp 2": (2, dict(strategy="tp", gpus=2)),
    "pp 4": (4, dict(strategy="pp", gpus=4)),
    "dp 2 x pp 2": (4, dict(strategy="pp", gpus=4, dp=2)),
}


def test_a_pp_2_checkpoint_resumes_under_every_other_layout(tmp_path):
    """Run A (pp 2) saves at step K; B resumes it under another layout for MORE steps. B's losses
    after the resume must equal an uninterrupted single-device run's: the weights, the AdamW state
    and the data position all crossed the layout change (dp 2 included: no batch skipped or seen
    twice)."""
    import shutil

    from harness import run_ranks

    straight = run_ranks(Train(None, strategy="reference", steps=K + MORE), 1)[0]["losses"]
    a = tmp_path / "a"
    run_ranks(Train(str(a), strategy="pp", gpus=2, steps=K, checkpoint_every=K), 2)
    assert (a / "checkpoint" / f"step-{K:08d}" / ".metadata").exists()
    for name, (world, kw) in RESUME_AS.items():
        b = tmp_path / name.replace(" ", "_")
        shutil.copytree(a, b)
        (b / "result.json").unlink()
        r = run_ranks(Train(str(b), steps=K + MORE, **kw), world, timeout_s=600)[0]
        assert len(r["losses"]) == K + MORE, name
        for got, want in zip(r["losses"][K:], straight[K:]):
            # fp32, TF32 off: A and B each sum in another order than the reference (parity 1e-5)
            assert abs(got - want) <= 1e-5 * abs(want), (name, r["losses"], straight)
        assert r["check"]["passed"], (name, r["check"])


def test_a_rank_killed_during_a_save_leaves_the_last_checkpoint_good(tmp_path):
    """Rank 1 dies inside the second save (step 4): the step-2 checkpoint still resumes, and the
    resumed run ends exactly where an uninterrupted one does."""
    from harness import RankFailed, run_ranks

    run = tmp_path / "run"
    with pytest.raises(RankFailed):
        run_ranks(DieInSecondSave(str(run)), 2, timeout_s=120)
    latest = (run / "checkpoint" / "latest.json").read_text()
    assert '"step": 2' in latest
    resumed = run_ranks(Train(str(run), strategy="pp", gpus=2, steps=6, checkpoint_every=2), 2)[0]
    straight = run_ranks(Train(None, strategy="pp", gpus=2, steps=6), 2)[0]
    assert resumed["losses"] == straight["losses"]  # same layout: bit for bit
    assert not any(p.name.endswith(".partial") for p in (run / "checkpoint").iterdir())


class DieInSecondSave:
    def __init__(self, out: str) -> None:
        self.out = out

    def __call__(self):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        real, calls = dcp.save, {"n": 0}

        def save(*args, **kwargs):
            calls["n"] += 1
            out = real(*args, **kwargs)
            if calls["n"] == 2 and dist.get_rank() == 1:
                os._exit(1)  # killed after writing its shard, before the checkpoint is published
            return out

        dcp.save = save
        Train(self.out, strategy="pp", gpus=2, steps=6, checkpoint_every=2, dist_timeout_s=20)()


def test_exported_weights_load_into_the_plain_model_and_score_the_same(tmp_path):
    import torch

    from core.data import batches  # noqa: F401  (the same data module the run used)
    from core.models import build_model
    from jobs.submit import main

    data = small_mnist(512, 128)
    c = cfg(strategy="mp", gpus=3, steps=4, batch_size=32, checkpoint_every=4, out=str(tmp_path / "run"))
    r = run(c, one_process(c), get_build("mp"), out_dir=str(tmp_path / "run"), dataset=data)
    target = tmp_path / "weights.pt"
    assert main(["--export", str(tmp_path / "run"), str(target)]) == 0
    model = build_model("mnist-cnn")
    model.load_state_dict(torch.load(target, weights_only=True))  # the plain, uncut model
    model.eval()
    with torch.no_grad():
        hits = (model(data.test.x).argmax(1) == data.test.y).float().mean().item()
    assert hits == pytest.approx(r["eval_accuracy"], abs=1e-9)
    # exporting again is refused without --force; nothing is overwritten
    before = target.stat().st_mtime_ns
    assert main(["--export", str(tmp_path / "run"), str(target)]) == 2
    assert target.stat().st_mtime_ns == before


def test_init_from_seeds_a_run_and_mismatches_are_named(tmp_path, capsys):
    import torch

    from core.models import build_model
    from jobs.submit import main

    good = tmp_path / "good.pt"
    torch.save(build_model("gpt", "tiny").state_dict(), good)
    common = ["--model", "gpt", "--cluster", "local", "--device", "cpu", "--dry-run"]
    assert main(["--strategy", "pp", "--gpus", "2", "--init-from", str(good), *common]) == 0
    bad = tmp_path / "bad.pt"
    sd = build_model("gpt", "tiny").state_dict()
    sd["blocks.h0.attn.q.weight"] = torch.zeros(3, 3)
    torch.save(sd, bad)
    capsys.readouterr()
    assert main(["--init-from", str(bad), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'blocks.h0.attn.q.weight' has shape (3, 3)" in err


class BackgroundSave:
    """Two gloo ranks of a tp 2 model: a background (async) save is invisible until finish()
    publishes it, and then loads back exactly, also into a single process's whole model."""

    def __init__(self, out: str) -> None:
        self.out = out

    def __call__(self) -> dict:
        import torch

        from core.parallel.distributed import full_tensor
        from core.training.checkpoint import Checkpointer
        from core.training.train import make_optimizer
        from jobs.plan.strategies import get_build

        from helpers import join

        c = cfg(strategy="tp", gpus=2, model="gpt")
        state = join(c)
        torch.manual_seed(0)
        from core.models import build_model

        built = get_build("tp")(build_model("gpt"), c, state)
        opt = make_optimizer(c, [p for _, p in built.params])
        ck = Checkpointer(self.out, state)
        ck.save(built.params, opt, {"step": 7, "epoch": 0, "batch": 7}, [1.0], c.to_dict(), background=True)
        published_early = ck.exists()
        ck.finish()
        saved = {n: full_tensor(p).clone() for n, p in built.params}
        with torch.no_grad():
            for _, p in built.params:
                p.zero_()
        position, losses, _ = ck.load(built.params, opt)
        same = all(torch.equal(full_tensor(p), saved[n]) for n, p in built.params)
        return {"early": published_early, "same": same, "position": position, "rank": state.rank}


def test_a_background_save_is_published_only_when_complete(tmp_path):
    from harness import run_ranks

    results = run_ranks(BackgroundSave(str(tmp_path)), 2)
    for r in results:
        assert not r["early"]  # latest.json appeared only after the write finished
        assert r["same"] and r["position"]["step"] == 7
    assert (tmp_path / "checkpoint" / "step-00000007" / ".metadata").exists()


def test_a_resumed_optimizer_keeps_its_own_kernel_choice(tmp_path):
    """Found on 2 H200s: a pp run's fused AdamW (plain CUDA tensors) resumed under tp, whose mix
    of DTensors and tensors refuses fused kernels, and the loaded param groups switched fused on."""
    import torch

    from core.models import build_model
    from core.training.checkpoint import Checkpointer

    c = cfg(strategy="reference", model="gpt")
    state = one_process(c)
    params = list(build_model("gpt").named_parameters())
    saving = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
    for _, p in params:
        p.grad = torch.ones_like(p)
    saving.step()
    ck = Checkpointer(str(tmp_path), state)
    ck.save(params, saving, {"step": 1, "epoch": 0, "batch": 1}, [1.0], c.to_dict())
    saved_moment = saving.state_dict()["state"][0]["exp_avg"].clone()
    for _, p in params:
        p.grad = None  # as at the start of a resumed run
    resuming = torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=False)
    ck.load(params, resuming)
    assert resuming.param_groups[0]["foreach"] is False
    assert torch.equal(resuming.state_dict()["state"][0]["exp_avg"], saved_moment)  # the moments did load


def test_a_stage_without_parameters_trains_checks_saves_and_resumes(tmp_path):
    """mnist-cnn's pool block holds no parameters, and --split 1,1,1,3 gives it a stage of its own
    (as --balance time may, by measured time: CI met it that way). torch refuses an optimizer over
    no parameters and DCP a rank's empty model state dict; such a stage steps and saves nothing."""
    import json

    from helpers import run_submit

    out = tmp_path / "run"
    local = ("--strategy", "pp", "--cluster", "local", "--device", "cpu", "--check")
    first = ("--gpus", "4", "--split", "1,1,1,3", "--steps", "4", "--checkpoint-every", "2", "--out", out)
    p = run_submit(*local, *first, cwd=tmp_path)
    assert p.returncode == 0 and "check PASSED" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    # resumed under another cut: the parameterless stage's (empty) share of the checkpoint is read too
    p = run_submit("--resume", out, "--steps", "6", "--strategy", "pp", "--gpus", "2", "--split", "3,3", cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((out / "result.json").read_text())
    assert r["steps"] == 6 and len(r["losses"]) == 6 and r["check"]["passed"], r["check"]
