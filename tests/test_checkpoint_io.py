"""Checkpoint bytes: host staging reused across saves, background writes that hold their step's
values, the wait when a write is still running, the fallback without host memory, and the atomic
publish when a rank dies inside a background write."""

from __future__ import annotations

import os
import threading

import pytest

from helpers import cfg, one_process


def _trained(flavor: str = "tiny"):
    import torch

    from core.models import build_model
    from core.training.train import make_optimizer

    c = cfg(strategy="reference", model="gpt", flavor=flavor)
    torch.manual_seed(0)
    params = list(build_model("gpt", flavor).named_parameters())
    opt = make_optimizer(c, [p for _, p in params])
    for _, p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return c, params, opt


def test_a_background_save_holds_its_step_reuses_its_buffers_and_waits_only_when_running(tmp_path, monkeypatch):
    import torch

    from core.training import checkpoint_io
    from core.training.checkpoint import Checkpointer

    c, params, opt = _trained()
    gate, real = threading.Event(), checkpoint_io.write

    def held_write(*args, **kwargs):
        gate.wait(30)  # the write of step 1 is still running when step 2 is saved
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "write", held_write)
    lines: list[str] = []
    ck = Checkpointer(str(tmp_path), one_process(c), log=lines.append)
    ck.save(params, opt, {"step": 1, "epoch": 0, "batch": 1}, [1.0], c.to_dict(), background=True)
    step1 = {n: p.detach().clone() for n, p in params}
    buffers = ck._stage.buffers
    with torch.no_grad():  # training moves on while step 1 is written
        for _, p in params:
            p.add_(1.0)
    assert not ck.exists()  # not published before its write is done
    threading.Timer(0.3, gate.set).start()
    ck.save(params, opt, {"step": 2, "epoch": 0, "batch": 2}, [1.0, 1.0], c.to_dict(), background=True)
    assert any("waiting for the write of step 1" in line for line in lines), lines
    assert ck._stage.buffers is buffers  # allocated once, reused by the second save
    ck.finish()
    assert sum("host memory per rank" in line for line in lines) == 1
    ck.load_state(params, opt, str(tmp_path / "checkpoint" / "step-00000001"))
    assert all(torch.equal(p, step1[n]) for n, p in params)  # step 1's values, not the moved-on ones
    s = ck.summary()
    assert s["saves"] == 2 and s["background"] == [True, True] and len(s["pause_s"]) == 2
    assert s["bytes_per_save"] and s["host_staging_bytes"] > 0
    lines.clear()  # a third save finds no write running: no wait, no message
    ck.save(params, opt, {"step": 3, "epoch": 0, "batch": 3}, [1.0] * 3, c.to_dict(), background=True)
    ck.finish()
    assert not any("waiting" in line for line in lines)


def test_a_job_that_finds_its_latest_checkpoint_broken_resumes_the_newest_intact_one(tmp_path):
    """What a requeued attempt meets when the latest checkpoint broke after the submission: the
    job's own load falls back and says so in one line. Pruning also leaves exactly --keep-checkpoints
    folders (the pruned one is renamed aside at once, deleted off the save's path), and each save
    records where its time went."""
    import torch

    from core.training.checkpoint import PHASES, Checkpointer

    c, params, opt = _trained()
    lines: list[str] = []
    ck = Checkpointer(str(tmp_path), one_process(c), keep=2, log=lines.append)
    values = {}
    for step in (1, 2, 3):
        ck.save(params, opt, {"step": step, "epoch": 0, "batch": step}, [1.0] * step, c.to_dict())
        values[step] = {n: p.detach().clone() for n, p in params}
        with torch.no_grad():
            for _, p in params:
                p.add_(1.0)
    ck._deleter.shutdown(wait=True)
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "step-00000002", "step-00000003"]
    phases = ck.summary()["phases_s"]
    assert set(phases) == set(PHASES) and all(len(v) == 3 for v in phases.values())
    os.truncate(folder / "step-00000003" / "__0_0.distcp", 10)  # broken after it was published
    lines.clear()
    position, losses, _ = ck.load(params, opt)
    assert position["step"] == 2 and losses == [1.0, 1.0]
    assert all(torch.equal(p, values[2][n]) for n, p in params)
    assert [line for line in lines if line.startswith("resume:")] == [
        f"resume: the latest checkpoint is broken ({folder}/step-00000003/__0_0.distcp is truncated "
        f"(10 of {_recorded_end(folder / 'step-00000003', '__0_0.distcp'):,} bytes)): using step-00000002, "
        "the newest intact one"
    ], lines


def _recorded_end(folder, name: str) -> int:
    from torch.distributed.checkpoint import FileSystemReader

    infos = FileSystemReader(str(folder)).read_metadata().storage_data.values()
    return max(i.offset + i.length for i in infos if i.relative_path == name)


def test_without_host_memory_for_staging_saves_block_and_say_so_once(tmp_path, monkeypatch):
    from core.training import checkpoint_io
    from core.training.checkpoint import Checkpointer

    monkeypatch.setattr(checkpoint_io, "host_memory_available", lambda: 1)
    c, params, opt = _trained()
    lines: list[str] = []
    ck = Checkpointer(str(tmp_path), one_process(c), log=lines.append)
    for step in (1, 2):
        ck.save(params, opt, {"step": step, "epoch": 0, "batch": step}, [1.0], c.to_dict(), background=True)
        assert ck.exists() and ck._pending is None  # written and published before the call returned
    assert sum("saves block training instead" in line for line in lines) == 1, lines
    assert ck.summary()["background"] == [False, False]


def test_tensors_are_written_as_their_own_bytes_and_read_back_into_any_layout(tmp_path):
    """Views of one block (how staged state lies in page-locked memory) are written without a copy
    of the block per tensor: the files hold the tensors' bytes, marked raw in DCP's index; they
    read back exactly into whole tensors, into one shard of them, and through --export's reader."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    from core.training import checkpoint_io
    from core.training.raw_tensor_files import RAW

    block = torch.arange(4096, dtype=torch.float32)
    state = {
        "model": {"w": block[:1200].view(40, 30), "b": block[1200:1240].to(torch.bfloat16)},
        "optim": {"step": torch.tensor(7.0), "lr": 0.5},
    }
    folder = str(tmp_path / "ck")
    checkpoint_io.write(state, folder, None, threads=2)
    tensor_bytes = 1200 * 4 + 40 * 2 + 4
    data = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".distcp"))
    assert tensor_bytes <= data < tensor_bytes + 2000, data  # not 4096*4 per view, no archive per tensor
    index = FileSystemReader(folder).read_metadata().storage_data
    assert sum(RAW in (i.transform_descriptors or ()) for i in index.values()) == 3

    back = {
        "model": {"w": torch.zeros(40, 30), "b": torch.zeros(40, dtype=torch.bfloat16)},
        "optim": {"step": torch.tensor(0.0), "lr": 0.0},
    }
    checkpoint_io.read(back, folder)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and torch.equal(back["model"]["b"], state["model"]["b"])
    assert back["optim"]["step"].item() == 7.0 and back["optim"]["lr"] == 0.5

    whole = checkpoint_io.read_whole(folder)
    assert torch.equal(whole["model"]["w"], state["model"]["w"])

    # another dtype on the receiving side goes through one temporary of the saved chunk
    half = {"model": {"w": torch.zeros(40, 30, dtype=torch.float64)}}
    checkpoint_io.read(half, folder)
    assert torch.equal(half["model"]["w"], state["model"]["w"].double())


def test_a_plain_dcp_checkpoint_still_reads_and_a_short_file_is_named(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from core.training import checkpoint_io

    plain = str(tmp_path / "plain")
    dcp.save({"model": {"w": torch.arange(6.0)}}, checkpoint_id=plain, no_dist=True)
    back = {"model": {"w": torch.zeros(6)}}
    checkpoint_io.read(back, plain)
    assert torch.equal(back["model"]["w"], torch.arange(6.0))

    raw = str(tmp_path / "raw")
    checkpoint_io.write({"model": {"w": torch.arange(1000.0)}}, raw, None, threads=1)
    os.truncate(os.path.join(raw, "__0_0.distcp"), 100)
    with pytest.raises(BaseException) as e:  # DCP's CheckpointException is a BaseException
        checkpoint_io.read({"model": {"w": torch.zeros(1000)}}, raw)
    assert "__0_0.distcp ends at" in str(e.value)


class DieInBackgroundWrite:
    """Two gloo ranks save step 1 (blocking), then step 2 in the background; rank 1 dies inside
    its write of step 2. Rank 0 must not publish step 2."""

    def __init__(self, out: str) -> None:
        self.out = out

    def __call__(self):
        import torch

        from core.training import checkpoint_io
        from core.training.checkpoint import Checkpointer

        from helpers import join

        c = cfg(strategy="pp", gpus=2, model="gpt")
        state = join(c, timeout_s=20)
        _, params, opt = _trained()
        real = checkpoint_io.write

        def write(data, path, group, *a, **k):
            real(data, path, group, *a, **k)
            if "step-00000002" in path and state.rank == 1:
                os._exit(1)  # killed after writing its files, before the checkpoint is published

        checkpoint_io.write = write
        ck = Checkpointer(self.out, state)
        ck.save(params, opt, {"step": 1, "epoch": 0, "batch": 1}, [1.0], c.to_dict())
        with torch.no_grad():
            for _, p in params:
                p.add_(1.0)
        ck.save(params, opt, {"step": 2, "epoch": 0, "batch": 2}, [1.0, 1.0], c.to_dict(), background=True)
        ck.finish()


def test_a_rank_killed_inside_a_background_write_leaves_the_last_checkpoint_latest(tmp_path):
    import torch

    from core.training.checkpoint import Checkpointer

    from harness import RankFailed, run_ranks

    with pytest.raises(RankFailed):
        run_ranks(DieInBackgroundWrite(str(tmp_path)), 2, timeout_s=120)
    assert '"step-00000001"' in (tmp_path / "checkpoint" / "latest.json").read_text()
    assert not (tmp_path / "checkpoint" / "step-00000002").exists()
    c, params, opt = _trained()  # the step-1 values, as each rank held them
    saved = {n: p.detach().clone() for n, p in params}
    with torch.no_grad():
        for _, p in params:
            p.zero_()
    Checkpointer(str(tmp_path), one_process(c)).load(params, opt)
    assert all(torch.equal(p, saved[n]) for n, p in params)  # resumes bit for bit
