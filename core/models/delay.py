"""The 'delay' model: blocks that pass tensors through, waiting f in forward and 2f in backward.

Real compute would hide a schedule's shape behind noise; fixed waits make the bubble of every
pipeline schedule visible and measurable on any machine. Forward waits f, backward 2f (the usual
assumption that backward costs twice forward). On CPU the wait is a sleep; on GPU a device-side
spin (torch.cuda._sleep), so the host runs ahead as with real kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.models.base import BlockModel


@dataclass(frozen=True)
class DelayFlavor:
    blocks: int
    forward_ms: float
    width: int = 16


DELAY_FLAVORS = {
    "tiny": DelayFlavor(blocks=8, forward_ms=2.0),
    "small": DelayFlavor(blocks=8, forward_ms=10.0),
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
    def forward(ctx, x: torch.Tensor, ms: float) -> torch.Tensor:
        ctx.ms = ms
        wait(ms, x.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        wait(2 * ctx.ms, grad.device)
        return grad, None


class DelayBlock(nn.Module):
    def __init__(self, width: int, forward_ms: float) -> None:
        super().__init__()
        self.forward_ms = forward_ms
        self.scale = nn.Parameter(torch.ones(width))  # a weight, so there are gradients to check

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Wait.apply(x * self.scale, self.forward_ms)


class DelayModel(BlockModel):
    def __init__(self, flavor: str = "tiny") -> None:
        super().__init__()
        self.flavor = DELAY_FLAVORS[flavor]
        for i in range(self.flavor.blocks):
            self.blocks[f"d{i}"] = DelayBlock(self.flavor.width, self.flavor.forward_ms)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)
