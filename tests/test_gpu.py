"""GPU parity (``pytest -m gpu`` on a GPU node): every style on CUDA/NCCL against the single-GPU reference.

Cases needing more GPUs than the node has skip with "needs N GPU(s), found M". fp32 runs with TF32
off (tolerance 1e-5, as on CPU); bf16 autocast is checked at 2e-2 (8 mantissa bits: ~4e-3 per
rounding, a few roundings deep).
"""

from __future__ import annotations

import pytest
import torch

from core.data import Dataset, Split
from core.parallel.distributed import DistState
from core.training.train import run
from jobs.plan.strategies import get_build
from pp.schedules import SCHEDULES

from harness import run_ranks
from helpers import cfg, join, one_process


def mnist_shaped(n: int = 1024, seed: int = 0) -> Dataset:
    """MNIST-shaped tensors (the GPU node may be offline and have no digits); parity needs no digits."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Dataset(Split(x[: n - 256], y[: n - 256]), Split(x[n - 256 :], y[n - 256 :]), "mnist-shaped noise")


def cuda_state(c) -> DistState:
    return one_process(c, torch.device("cuda", 0))


@pytest.mark.gpu(gpus=1)
@pytest.mark.parametrize("model", ["mnist-cnn", "gpt"])
def test_reference_on_cuda_matches_cpu(model):
    data = mnist_shaped() if model == "mnist-cnn" else None
    # check=True turns dropout off: CPU and CUDA draw different masks from the same seed
    kw = dict(strategy="reference", model=model, steps=3, check=True, batch_size=32 if model == "mnist-cnn" else 8)
    on_gpu, on_cpu = cfg(device="cuda", **kw), cfg(device="cpu", **kw)
    gpu = run(on_gpu, cuda_state(on_gpu), get_build("reference"), dataset=data)
    cpu = run(on_cpu, one_process(on_cpu), get_build("reference"), dataset=data)
    for a, b in zip(gpu["losses"], cpu["losses"]):
        # different kernels (cuDNN vs oneDNN), same fp32 math: agreement to ~1e-6 relative
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (gpu["losses"], cpu["losses"])


@pytest.mark.gpu(gpus=1)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model", ["mnist-cnn", "gpt"])
def test_mp_with_all_stages_on_available_gpus_matches_reference(model, dtype):
    n = torch.cuda.device_count()
    c = cfg(
        strategy="mp",
        gpus=3,
        model=model,
        dtype=dtype,
        device="cuda",
        steps=3,
        check=True,
        batch_size=32 if model == "mnist-cnn" else 8,
    )
    r = run(c, cuda_state(c), get_build("mp"), dataset=mnist_shaped() if model == "mnist-cnn" else None)
    assert r["check"]["passed"], r["check"]
    if n == 1:  # all three stages on cuda:0: the very same kernels, so exactly equal
        assert r["check"]["max_grad_rel_diff"] == 0.0 and r["check"]["max_loss_abs_diff"] == 0.0


class GpuMatrix:
    def __init__(self, world: int, dtype: str) -> None:
        self.world, self.dtype = world, dtype

    def __call__(self) -> dict:
        import os

        from core.parallel import distributed

        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        out = {}
        try:
            for schedule in SCHEDULES:
                c = cfg(
                    strategy="pp",
                    gpus=self.world,
                    model="gpt",
                    schedule=schedule,
                    steps=2,
                    check=True,
                    device="cuda",
                    dtype=self.dtype,
                    batch_size=4 * self.world,
                )
                try:
                    from jobs.plan.strategies import validate_run

                    validate_run(c)
                except Exception:
                    continue
                out[("pp", schedule)] = run(c, join(c, "cuda", 120), get_build("pp"))["check"]
            for sp in (False, True):
                c = cfg(
                    strategy="tp",
                    gpus=self.world,
                    model="gpt",
                    steps=2,
                    check=True,
                    device="cuda",
                    dtype=self.dtype,
                    sequence_parallel=sp,
                )
                out[("tp", sp)] = run(c, join(c, "cuda", 120), get_build("tp"))["check"]
            # data parallel: pure dp over every GPU (both modes), and dp x the other styles
            gpu = dict(model="gpt", steps=2, check=True, device="cuda", dtype=self.dtype, batch_size=4 * self.world)
            for mode in ("fsdp", "ddp"):
                c = cfg(strategy="dp", gpus=self.world, dp_mode=mode, **gpu)
                out[("dp", mode)] = run(c, join(c, "cuda", 120), get_build("dp"))["check"]
            if self.world == 4:
                c = cfg(strategy="pp", gpus=4, tp=2, **gpu)
                out[("pp x tp", "1f1b")] = run(c, join(c, "cuda", 120), get_build("pp"))["check"]
                for name, kw in {
                    "dp x pp": dict(strategy="pp", dp=2),
                    "dp x tp": dict(strategy="tp", dp=2, tp=2),
                }.items():
                    c = cfg(gpus=4, **kw, **gpu)
                    out[(name, "")] = run(c, join(c, "cuda", 120), get_build(c.strategy))["check"]
        finally:
            distributed.shutdown()
        return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("world", [pytest.param(w, marks=pytest.mark.gpu(gpus=w)) for w in (2, 4)])
def test_pp_and_tp_on_nccl_match_reference(world, dtype):
    results = run_ranks(GpuMatrix(world, dtype), world, timeout_s=900)
    assert results[0], "no case ran"
    for case, check in results[0].items():
        assert check["passed"], (case, check)
