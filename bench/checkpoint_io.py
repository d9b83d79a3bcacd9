"""What a checkpoint costs on one device, beside the limits measured in the same run.

gpt in bf16 autocast with AdamW after one step (weights + two moments in fp32: 12 bytes per
parameter), saved through the suite's Checkpointer (torch.distributed.checkpoint, atomic publish)
to local disk. The limits: the disk's write rate (the same bytes from host memory, 16 MiB writes,
one fdatasync, as ``dd bs=16M conv=fdatasync``) and its read rate with the file dropped from the
page cache (posix_fadvise DONTNEED; where the machine ignores that the read is marked cached).
Rows: the blocking save (first: allocates the host staging; then steady), the load (cache
dropped), the background save's pause and whole write, and a training step's time while that
write runs against one without. Figures only.

    python bench/checkpoint_io.py --flavors 356m,1.3b [--dir /tmp/ckpt-bench]
    python bench/checkpoint_io.py --device cpu --flavors small       # CI size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from core.config import RunConfig  # noqa: E402
from core.models import build_model  # noqa: E402
from core.models.gpt import GPT_FLAVORS  # noqa: E402
from core.parallel.distributed import init_distributed  # noqa: E402
from core.parallel.layout import Layout  # noqa: E402
from core.training import checkpoint_io  # noqa: E402
from core.training.checkpoint import Checkpointer, _state_dicts, param_holder  # noqa: E402
from core.training.checkpoint_io import folder_bytes, state_bytes  # noqa: E402
from core.training.train import make_optimizer  # noqa: E402

CHUNK = 16 << 20


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def drop_cache(path: str) -> None:
    """Drop ``path``'s pages (a file, or every file under a folder) from the page cache."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_limits(root: str, nbytes: int) -> dict:
    """The disk's write rate (fdatasync) and cold read rate for ``nbytes``, in GiB/s."""
    path = os.path.join(root, "limit.bin")
    buf = memoryview(torch.ones(CHUNK, dtype=torch.uint8).numpy())
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    left = nbytes
    while left > 0:
        left -= os.write(fd, buf[: min(left, CHUNK)])
    os.fdatasync(fd)
    os.close(fd)
    write_s = time.perf_counter() - t
    drop_cache(path)
    out = bytearray(CHUNK)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(out):
            pass
    read_s = time.perf_counter() - t
    os.remove(path)
    read = nbytes / 2**30 / read_s
    return {"disk_write_gib_s": round(nbytes / 2**30 / write_s, 3), "disk_read_gib_s": round(read, 3)}


def step_times(model, opt, x, n: int, until=None) -> list[float]:
    """Training step times (s): ``n`` steps, or as many as run until ``until()`` is true."""
    out = []
    while (until is None and len(out) < n) or (until is not None and not until() and len(out) < 10 * n):
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = model.loss(model(x), x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        out.append(time.perf_counter() - t)
    return out


def measure(flavor: str, root: str, device: str, batch: int, threads: list[int]) -> dict:
    cfg = RunConfig(strategy="reference", model="gpt", flavor=flavor, dtype="bf16", device=device)
    state = init_distributed(Layout.from_config(cfg), device)
    torch.manual_seed(0)
    model = build_model("gpt", flavor).to(state.device)
    params = list(model.named_parameters())
    opt = make_optimizer(cfg, [p for _, p in params])
    f = GPT_FLAVORS[flavor]
    x = torch.randint(0, f.vocab, (batch, f.seq_len), device=state.device)
    step_times(model, opt, x, 3)  # the optimizer's state exists, kernels are warm
    nbytes = state_bytes(_state_dicts(param_holder(params), opt))
    os.makedirs(root, exist_ok=True)
    row: dict = {"flavor": flavor, "state_gib": round(nbytes / 2**30, 3), **disk_limits(root, nbytes)}
    run = os.path.join(root, flavor)
    shutil.rmtree(run, ignore_errors=True)
    ck = Checkpointer(run, state, keep=1)
    pos = {"step": 1, "epoch": 0, "batch": 1}
    saves = []
    for i in range(2):  # the first allocates the host staging, the second reuses it
        t = time.perf_counter()
        folder = ck.save(params, opt, {**pos, "step": i + 1}, [0.0], cfg.to_dict())
        saves.append(time.perf_counter() - t)
    size = folder_bytes(folder)
    files_rates = {}
    for n in threads:  # the same staged bytes in n files per rank (n writer threads)
        sweep = os.path.join(root, f"{flavor}-files{n}")
        t = time.perf_counter()
        checkpoint_io.write(ck._stage.buffers or _state_dicts(param_holder(params), opt), sweep, None, threads=n)
        files_rates[n] = round(size / 2**30 / (time.perf_counter() - t) / row["disk_write_gib_s"], 3)
        shutil.rmtree(sweep, ignore_errors=True)
    drop_cache(folder)
    t = time.perf_counter()
    ck.load(params, opt)
    sync()
    load_s = time.perf_counter() - t
    quiet = step_times(model, opt, x, 10)
    t = time.perf_counter()
    ck.save(params, opt, {**pos, "step": 3}, [0.0], cfg.to_dict(), background=True)
    pause = time.perf_counter() - t
    during = step_times(model, opt, x, 10, until=lambda: ck._pending[0].done())
    ck.finish()
    whole = time.perf_counter() - t
    quiet += step_times(model, opt, x, 10)
    gib = size / 2**30
    row.update(
        checkpoint_gib=round(gib, 3),
        save_first_s=round(saves[0], 3),
        save_s=round(saves[1], 3),
        save_gib_s=round(gib / saves[1], 3),
        save_vs_disk=round(gib / saves[1] / row["disk_write_gib_s"], 3),
        save_files_s=ck.summary()["phases_s"]["files_s"][1],  # the folder, RNG file and data files
        save_files_vs_disk_by_file_count=files_rates,
        load_s=round(load_s, 3),
        load_files_s=round(ck.load_files_s, 3),
        load_gib_s=round(gib / load_s, 3),
        load_vs_disk=round(gib / load_s / row["disk_read_gib_s"], 3),
        async_pause_s=round(pause, 3),
        async_whole_s=round(whole, 3),
        step_ms=round(1e3 * statistics.median(quiet), 2),
        step_during_write_ms=round(1e3 * statistics.median(during), 2),
        steps_during_write=len(during),
        step_slowdown=round(statistics.median(during) / statistics.median(quiet), 3),
        summary=ck.summary(),
    )
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


COLUMNS = (
    ("flavor", "model"),
    ("checkpoint_gib", "GiB"),
    ("disk_write_gib_s", "disk write GiB/s"),
    ("save_s", "save s"),
    ("save_gib_s", "GiB/s"),
    ("save_vs_disk", "x disk"),
    ("save_files_s", "of which files s"),
    ("disk_read_gib_s", "disk read GiB/s"),
    ("load_s", "load s"),
    ("load_files_s", "of which files s"),
    ("load_vs_disk", "x disk"),
    ("async_pause_s", "pause s"),
    ("async_whole_s", "whole s"),
    ("step_slowdown", "step during write"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavors", default="356m,1.3b")
    ap.add_argument("--dir", default="/tmp/ckpt-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--files", default="1,2,4,8", help="also write the staged state with each of these files-per-rank counts"
    )
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "checkpoint_io.json"))
    a = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    files = [int(n) for n in a.files.split(",") if n]
    rows = [measure(f, a.dir, a.device, a.batch, files) for f in a.flavors.split(",")]
    print("| " + " | ".join(h for _, h in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k, _ in COLUMNS) + " |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        device = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    shutil.rmtree(a.dir, ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
