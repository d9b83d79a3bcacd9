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


def balanced_split(block_params: list[int], stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the largest stage's parameter count.

    Balance by parameters, because a model is split to fit memory; ties go to the split with the
    most even block counts. Linear-partition DP, O(stages * blocks^2).
    """
    n = len(block_params)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    # cost of a stage: parameters first, block count second (integer weighting keeps it exact)
    weight = n + 1
    prefix = [0]
    for p in block_params:
        prefix.append(prefix[-1] + p)

    def cost(i: int, j: int) -> int:  # blocks i..j-1
        return (prefix[j] - prefix[i]) * weight + (j - i)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                c = max(best[s - 1][i], cost(i, j))
                if c < best[s][j]:
                    best[s][j], cut[s][j] = c, i
    sizes, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def stage_blocks(model: BlockModel, stages: int, split: list[int] | None = None) -> list[list[str]]:
    """Block names of each stage: the seams mp and pp both cut at."""
    names = model.block_names()
    sizes = split if split is not None else balanced_split(model.block_params(), stages)
    out, start = [], 0
    for size in sizes:
        out.append(names[start : start + size])
        start += size
    return out
