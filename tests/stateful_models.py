"""Models the built-in ones do not cover, given to the suite as ``--model stateful_models:NAME``:
state beyond parameters (a buffer that feeds the forward, a counter), random layers torch does not
ship, and nested tuples at the seams."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models import BlockModel


class _Digits(BlockModel):
    default_batch_size = 32
    default_lr = 0.05
    default_dataset = "mnist"
    datasets = ("mnist",)
    classifier = True
    image_shape = (1, 28, 28)
    num_classes = 10

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)


class RunningCentre(nn.Module):
    """Subtracts a running mean of its input (a buffer that feeds the forward) and counts its calls."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.5).add_(0.5 * x.mean(0))
                self.calls += 1
        return x - self.mean


class Centred(_Digits):
    def __init__(self) -> None:
        super().__init__()
        self.blocks["fc1"] = nn.Sequential(nn.Flatten(1), nn.Linear(784, 32))
        self.blocks["centre"] = RunningCentre(32)
        self.blocks["fc2"] = nn.Sequential(nn.Tanh(), nn.Linear(32, 10))


def centred(flavor: str = "tiny") -> Centred:
    return Centred()


class Jitter(nn.Module):
    """A random layer torch does not ship: noise in training, its rate in ``drop_prob``."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        return x * (torch.rand_like(x) > self.drop_prob) / (1 - self.drop_prob)


class Noise(nn.Module):
    """Random in training with no rate to switch it off: --check must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn_like(x) if self.training else x


class Jittered(_Digits):
    def __init__(self, noise: bool = False) -> None:
        super().__init__()
        self.blocks["fc1"] = nn.Sequential(nn.Flatten(1), nn.Linear(784, 32), Jitter(0.3))
        self.blocks["fc2"] = nn.Sequential(Noise() if noise else nn.Identity(), nn.Linear(32, 10))


def jittered(flavor: str = "tiny") -> Jittered:
    return Jittered()


def noisy(flavor: str = "tiny") -> Jittered:
    return Jittered(noise=True)


class RowsLSTM(nn.Module):
    """Reads an image row by row; hands on ``(out, (h, c))`` as torch's LSTM returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(28, 16, batch_first=True)

    def forward(self, x: torch.Tensor):
        out, (h, c) = self.lstm(x.flatten(1, 2))
        return out, (h[-1], c[-1])  # batch first everywhere: pipelines cut micro-batches on dim 0


class Mix(nn.Module):
    """Takes and hands on the nested tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, seam):
        out, (h, c) = seam
        return out, (torch.tanh(self.fc(h)), c)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 10)

    def forward(self, seam) -> torch.Tensor:
        out, (h, c) = seam
        return self.fc(torch.cat([out[:, -1], h, c], dim=1))


class Recurrent(_Digits):
    def __init__(self) -> None:
        super().__init__()
        self.blocks["lstm"] = RowsLSTM()
        self.blocks["mix"] = Mix()
        self.blocks["head"] = Head()


def recurrent(flavor: str = "tiny") -> Recurrent:
    return Recurrent()


class Tied(_Digits):
    """One weight used by two blocks (as a language model ties its embedding and its head)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks["fc1"] = nn.Sequential(nn.Flatten(1), nn.Linear(784, 32), nn.Tanh())
        self.blocks["mid1"] = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
        self.blocks["mid2"] = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
        self.blocks["mid2"][0].weight = self.blocks["mid1"][0].weight
        self.blocks["head"] = nn.Linear(32, 10)


def tied(flavor: str = "tiny") -> Tied:
    return Tied()
