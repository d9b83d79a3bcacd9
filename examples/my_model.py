"""A user's own model, in its own file, outside the suite's packages: trained with mp, pp and tp.

    PYTHONPATH=examples python jobs/submit.py --strategy pp --gpus 2 --model my_model:build --check
    PYTHONPATH=examples python jobs/submit.py --strategy mp --gpus 3 --model my_model:build --check
    PYTHONPATH=examples python jobs/submit.py --strategy tp --gpus 2 --model my_model:build --check

A small token-mixing classifier (MLP-Mixer style) on vectors. It uses what README "Your own model"
allows at a seam: a block that hands on a tuple holding a transposed (non-contiguous) view, a
block whose input gradient is transposed, and a parameter outside the blocks that only the loss
uses. It brings its own loss,
defaults, synthetic data and tensor-parallel plan; the suite never needs its name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.data import Dataset, Split
from core.models import BlockModel

WIDTH, TOKENS, CLASSES, FEATURES = 32, 8, 4, 64


class Embed(nn.Module):
    """(B, FEATURES) -> (B, TOKENS, WIDTH)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(FEATURES, TOKENS * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(-1, TOKENS, WIDTH)


class TokenMix(nn.Module):
    """Mixes across tokens: (B, TOKENS, WIDTH) -> (B, WIDTH, TOKENS)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(TOKENS, TOKENS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(x.transpose(1, 2)))


class Branch(nn.Module):
    """Hands on a tuple: the normalised features and a skip path the next block adds back. The
    skip path is a transpose of the input (a non-contiguous view), and so is the gradient this
    block hands back for its input."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.transpose(1, 2)  # back to (B, TOKENS, WIDTH)
        return self.norm(x), x


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, skip = pair
        return skip + self.down(F.gelu(self.up(x)))


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x.mean(dim=1))


class Mixer(BlockModel):
    default_batch_size = 16
    default_lr = 0.05
    classifier = True

    def __init__(self) -> None:
        super().__init__()
        self.blocks["embed"] = Embed()
        self.blocks["mix"] = TokenMix()
        self.blocks["branch"] = Branch()
        self.blocks["ffn"] = FeedForward()
        self.blocks["head"] = Head()
        # outside the blocks, used only by the loss: the suite keeps it on the last stage
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output / self.temperature, target)

    def tp_plan(self, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict | None:
        """The feed-forward's hidden units split over the ranks: up by columns, down by rows, so
        the activations between them are sharded on the hidden dimension and one all-reduce after
        ``down`` makes them whole again; everything else is replicated."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {"blocks.ffn.up": ColwiseParallel(), "blocks.ffn.down": RowwiseParallel()}

    def tp_refusal(self, tp: int, sequence_parallel: bool, loss_parallel: bool, in_pipeline: bool) -> str | None:
        if (4 * WIDTH) % tp:
            return f"tensor parallel {tp} does not divide the feed-forward's {4 * WIDTH} hidden units"
        return super().tp_refusal(tp, sequence_parallel, loss_parallel, in_pipeline)

    def synthetic_data(self, batch_size: int, seed: int) -> Dataset:
        """Vectors labelled by a fixed random linear rule: learnable, and the same for every seed's run."""
        g = torch.Generator().manual_seed(seed + 7)
        n = max(64 * batch_size, 1024)
        x = torch.randn(n + 256, FEATURES, generator=g)
        y = (x @ torch.randn(FEATURES, CLASSES, generator=g)).argmax(dim=1)
        return Dataset(Split(x[:n], y[:n]), Split(x[n:], y[n:]), f"my_model's vectors: {n:,} labelled by a linear rule")


def build(flavor: str = "tiny") -> Mixer:
    return Mixer()


build.flavors = ("tiny",)
