"""Where does vanilla mp's per-step overhead come from on one GPU? Time the same mnist-cnn step
built four ways (figures only):

    python bench/mp_overhead_probe.py
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from core.config import RunConfig  # noqa: E402
from core.models import build_model  # noqa: E402
from core.parallel.distributed import DistState  # noqa: E402
from core.parallel.layout import Layout  # noqa: E402
from core.training.strategy import single_device_build  # noqa: E402
from mp.placement import build as mp_build  # noqa: E402
from mp.placement import place_layers  # noqa: E402


def per_step_ms(built, x, y, steps: int = 300) -> float:
    opt = torch.optim.SGD([p for _, p in built.params], lr=1e-3)
    for i in range(steps + 20):
        if i == 20:
            torch.cuda.synchronize()
            t = time.perf_counter()
        built.step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    dev = torch.device("cuda", 0)
    torch.backends.cudnn.allow_tf32 = False
    x, y = torch.randn(128, 1, 28, 28, device=dev), torch.randint(0, 10, (128,), device=dev)
    state = DistState(Layout.from_config(RunConfig(device="cuda")), device=dev)
    for _ in range(2):
        torch.manual_seed(0)
        print(
            "reference (whole model)         ",
            round(per_step_ms(single_device_build(build_model("mnist-cnn"), RunConfig(device="cuda"), dev), x, y), 3),
            "ms",
            flush=True,
        )
        m = build_model("mnist-cnn")
        place_layers(m, [dev] * 3)
        print(
            "place_layers only, 3 stages      ",
            round(per_step_ms(single_device_build(m, RunConfig(device="cuda"), dev), x, y), 3),
            "ms",
            flush=True,
        )
        for g in (1, 3):
            b = mp_build(build_model("mnist-cnn"), RunConfig(strategy="mp", gpus=g, device="cuda"), state)
            print(f"mp build, {g} stage(s) (timeline) ", round(per_step_ms(b, x, y), 3), "ms", flush=True)


if __name__ == "__main__":
    main()
