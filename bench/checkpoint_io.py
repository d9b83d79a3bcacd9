"""How long a checkpoint pauses training on one GPU: blocking save, load, and DCP's async save.

gpt in bf16 autocast with AdamW after one step (weights + two moments in fp32: 12 bytes per
parameter), saved through the suite's Checkpointer (torch.distributed.checkpoint, atomic
publish) to local disk, loaded back; then torch's ``dcp.async_save`` of the same state, timing the
pause (until it returns: the copy to host memory) and the whole write. Figures only.

    python bench/checkpoint_io.py --flavors 356m,1.3b [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from core.training.checkpoint import Checkpointer, _state_dicts, param_holder  # noqa: E402
from core.training.train import make_optimizer  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measure(flavor: str, root: str, device: str) -> dict:
    cfg = RunConfig(strategy="reference", model="gpt", flavor=flavor, dtype="bf16", device=device)
    state = init_distributed(Layout.from_config(cfg), device)  # a group of one: what async_save needs
    torch.manual_seed(0)
    model = build_model("gpt", flavor).to(state.device)
    params = list(model.named_parameters())
    opt = make_optimizer(cfg, [p for _, p in params])
    f = GPT_FLAVORS[flavor]
    x = torch.randint(0, f.vocab, (2, f.seq_len), device=state.device)
    with torch.autocast(state.device.type, dtype=torch.bfloat16):
        loss = model.loss(model(x), x)
    loss.backward()
    opt.step()
    sync()
    run = os.path.join(root, flavor)
    shutil.rmtree(run, ignore_errors=True)
    ck = Checkpointer(run, state)
    t = time.perf_counter()
    folder = ck.save(params, opt, {"step": 1, "epoch": 0, "batch": 1}, [float(loss)], cfg.to_dict())
    save_s = time.perf_counter() - t
    size = folder_bytes(folder)
    t = time.perf_counter()
    ck.load(params, opt)
    sync()
    load_s = time.perf_counter() - t

    import torch.distributed.checkpoint as dcp

    target = os.path.join(root, f"{flavor}-async")
    shutil.rmtree(target, ignore_errors=True)
    t = time.perf_counter()
    future = dcp.async_save(_state_dicts(param_holder(params), opt), checkpoint_id=target)
    pause_s = time.perf_counter() - t
    future.result()
    async_total_s = time.perf_counter() - t
    row = {
        "flavor": flavor,
        "params": sum(p.numel() for _, p in params),
        "checkpoint_gib": round(size / 2**30, 2),
        "blocking_save_s": round(save_s, 2),
        "load_s": round(load_s, 2),
        "async_pause_s": round(pause_s, 2),
        "async_total_s": round(async_total_s, 2),
        "save_gib_per_s": round(size / 2**30 / save_s, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavors", default="356m,1.3b")
    ap.add_argument("--dir", default="/tmp/ckpt-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    a = ap.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    if a.device == "cuda":  # async_save stages through host memory and needs a CPU backend beside NCCL
        torch.cuda.set_device(0)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    rows = [measure(f, a.dir, a.device) for f in a.flavors.split(",")]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "checkpoint_io.json"), "w") as fh:
        json.dump(
            {
                "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
                "torch": torch.__version__,
                "rows": rows,
            },
            fh,
            indent=1,
        )
    shutil.rmtree(a.dir, ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
