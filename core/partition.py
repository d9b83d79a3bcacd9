"""Where the model is cut: contiguous blocks per stage, one plan for mp and pp.

Partitioning lives apart from the models (torchgpipe keeps ``balance/`` apart from its models):
a model only lists its blocks; this module decides which stage holds which, by parameters
(``balanced_split``) or by measured time (``time_split`` over core.block_profile's costs). The
run's plan (``SplitPlan``, core.balance) is built once and handed to mp and pp alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.models.base import BlockModel


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


def time_split(
    block_s: list[float],
    stages: int,
    stage_bytes=None,
    capacity: float | None = None,
) -> list[int]:
    """Blocks per stage, contiguous, minimising the slowest stage's time within each device's memory.

    ``block_s``: each block's forward + backward time. ``stage_bytes(stage, i, j)``: memory stage
    ``stage`` needs holding blocks i..j-1 (its in-flight activations depend on its place in the
    pipeline); splits with a stage over ``capacity`` are never chosen. Ties go to the split with
    the most even block counts, as in ``balanced_split``. Linear-partition DP, O(stages * blocks^2).
    Raises ValueError when no split fits.
    """
    n = len(block_s)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0.0]
    for t in block_s:
        prefix.append(prefix[-1] + t)
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0)
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                if capacity is not None and stage_bytes is not None and stage_bytes(s - 1, i, j) > capacity:
                    continue
                c = (max(best[s - 1][i][0], prefix[j] - prefix[i]), max(best[s - 1][i][1], j - i))
                if c < best[s][j]:
                    best[s][j], cut[s][j] = c, i
    if best[stages][n] == inf:
        raise ValueError(f"no contiguous split of {n} blocks into {stages} stages fits {capacity / 2**30:.1f} GiB")
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
