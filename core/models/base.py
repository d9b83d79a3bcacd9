"""The block model every style cuts: an ordered ModuleDict whose forward runs the blocks it holds.

A stage (mp or pp) is the same class holding a subset of the blocks, so checkpoints and parameter
names (``blocks.fc1.weight``) are identical whatever the cut. Models know nothing of parallelism.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class BlockModel(nn.Module):
    """Blocks in order; forward skips absent ones (torchtitan's composability rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (pipelining's scale_grads=True assumes a mean)."""
        raise NotImplementedError

    def block_names(self) -> list[str]:
        return list(self.blocks.keys())

    def block_params(self) -> list[int]:
        return [sum(p.numel() for p in b.parameters()) for b in self.blocks.values()]

    def keep_only(self, names: list[str]) -> BlockModel:
        """A copy holding only ``names`` (a stage); parameter names stay those of the full model.

        Only the kept blocks are copied, so cutting a large model costs one stage's memory.
        """
        blocks = self.blocks
        self.blocks = nn.ModuleDict()
        try:
            stage = copy.deepcopy(self)
        finally:
            self.blocks = blocks
        for name in names:
            stage.blocks[name] = copy.deepcopy(blocks[name])
        return stage
