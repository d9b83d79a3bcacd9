"""The 'delay' model: blocks that pass tensors through and wait as long as compute would take.

Real compute would hide a schedule's shape behind noise; waits make the bubble of every pipeline
schedule visible and measurable on any machine. A block's forward waits ``ms_per_sample`` times
its relative cost for every sample it processes (x.shape[0]), because real compute grows with the
micro-batch: mp on a batch of 16 waits as long as a pipeline's 8 micro-batches of 2 together, so
pipelining wins by overlap, as it does on real hardware. ``call_overhead_ms`` is a fixed cost per
call (a kernel launch, a dispatch), named apart so it is never mistaken for compute. Backward
waits twice the per-sample part (the usual assumption that backward costs twice forward) plus
the same overhead. On CPU the wait is a sleep; on GPU a device-side spin (torch.cuda._sleep), so
the host runs ahead as with real kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from core.data import Dataset, Split, synthetic_vectors
from core.models.base import BlockModel

if TYPE_CHECKING:
    from core.data import Dataset


@dataclass(frozen=True)
class DelayFlavor:
    blocks: int
    ms_per_sample: float
    """Forward wait of a cost-1 block per sample it processes (backward: twice that)."""
    call_overhead_ms: float = 0.0
    """Fixed wait per forward and per backward call, whatever the batch (launch, dispatch)."""
    costs: tuple[float, ...] | None = None
    """Relative cost of each block (None: all 1); the per-sample wait is multiplied by it."""
    width: int = 16

    def cost(self, block: int) -> float:
        return 1.0 if self.costs is None else self.costs[block]

    def forward_ms(self, block: int, samples: int) -> float:
        """What block ``block``'s forward waits on ``samples`` samples."""
        return self.ms_per_sample * self.cost(block) * samples + self.call_overhead_ms


UNEVEN = (0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.5)

DELAY_FLAVORS = {
    "tiny": DelayFlavor(blocks=8, ms_per_sample=1.0),
    "small": DelayFlavor(blocks=8, ms_per_sample=5.0),
    # a light first block and a heavy last one, like gpt's embedding lookup and its 50k-wide head
    # with the loss: parameters are equal, so balancing by parameters puts 2 blocks on each of 4
    # stages (slowest stage 3.5) while balancing by time finds 3,2,2,1 (slowest 2.5)
    "uneven": DelayFlavor(blocks=8, ms_per_sample=1.0, costs=UNEVEN),
    # uneven with a declared size: 16 KiB of weights per block and 16 KiB of activations per sample
    # per block, so layouts differ in memory as they do in time (what --plan ranks), and waits long
    # enough that a loaded CPU's wake-up latency stays small beside them
    "uneven-wide": DelayFlavor(blocks=8, ms_per_sample=2.0, costs=UNEVEN, width=4096),
}

_cycles_per_ms: float | None = None


def _gpu_cycles_per_ms() -> float:
    """Calibrate torch.cuda._sleep once: it counts clock cycles, not time."""
    global _cycles_per_ms
    if _cycles_per_ms is None:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        torch.cuda._sleep(cycles // 10)  # warm up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _cycles_per_ms = cycles / start.elapsed_time(end)
    return _cycles_per_ms


def wait(ms: float, device: torch.device) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda._sleep(int(ms * _gpu_cycles_per_ms()))
    else:
        time.sleep(ms / 1000.0)


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, per_sample_ms: float, overhead_ms: float) -> torch.Tensor:
        ctx.per_sample_ms, ctx.overhead_ms = per_sample_ms, overhead_ms
        wait(per_sample_ms * x.shape[0] + overhead_ms, x.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wait(2 * ctx.per_sample_ms * grad.shape[0] + ctx.overhead_ms, grad.device)
        return grad, None, None


class DelayBlock(nn.Module):
    def __init__(self, width: int, per_sample_ms: float, overhead_ms: float = 0.0) -> None:
        super().__init__()
        self.per_sample_ms, self.overhead_ms = per_sample_ms, overhead_ms
        self.scale = nn.Parameter(torch.ones(width))  # a weight, so there are gradients to check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(x * self.scale, self.per_sample_ms, self.overhead_ms)


class DelayModel(BlockModel):
    def __init__(self, flavor: str = "tiny") -> None:
        super().__init__()
        self.flavor = f = DELAY_FLAVORS[flavor]
        for i in range(f.blocks):
            self.blocks[f"d{i}"] = DelayBlock(f.width, f.ms_per_sample * f.cost(i), f.call_overhead_ms)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def synthetic_data(self, batch_size: int, seed: int) -> Dataset:
        n = max(64 * batch_size, 1024)  # a few hundred steps, and a held-out tail of one batch
        split = synthetic_vectors(n + batch_size, self.flavor.width, seed)
        return Dataset(
            Split(split.x[:n], split.y[:n]), Split(split.x[n:], split.y[n:]), f"synthetic vectors: {n:,} samples"
        )


def build(flavor: str = "tiny") -> DelayModel:
    return DelayModel(flavor)


build.flavors = tuple(DELAY_FLAVORS)
