"""Where the model is cut: contiguous blocks per stage, one plan for mp and pp.

Partitioning lives apart from the models (torchgpipe keeps ``balance/`` apart from its models):
a model only lists its blocks; this module decides which stage holds which, by parameters
(``balanced_split``) or by measured time (``time_split`` over core.parallel.block_profile's costs). The
run's plan (``SplitPlan``, core.parallel.balance) is built once and handed to mp and pp alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.models.base import BlockModel


def _min_max_split(costs: list[float], stages: int, fits=None) -> list[int] | None:
    """Blocks per stage, contiguous, minimising the largest stage's total cost; None if none fits.

    A stage is ranked by (its total cost, its block count), so ties go to the split with the most
    even block counts. ``fits(stage, i, j)`` may refuse stage ``stage`` holding blocks i..j-1.
    Linear-partition DP, O(stages * blocks^2).
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    worst = (float("inf"), float("inf"))
    best = [[worst] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0, 0)
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == worst or (fits is not None and not fits(s - 1, i, j)):
                    continue
                c = max(best[s - 1][i], (prefix[j] - prefix[i], j - i))
                if c < best[s][j]:
                    best[s][j], cut[s][j] = c, i
    if best[stages][n] == worst:
        return None
    sizes, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def balanced_split(block_params: list[int], stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the largest stage's parameter count.

    Balance by parameters, because a model is split to fit memory; ties go to the split with the
    most even block counts.
    """
    return _min_max_split(block_params, stages)


def time_split(
    block_s: list[float],
    stages: int,
    stage_bytes=None,
    capacity: float | None = None,
) -> list[int]:
    """Blocks per stage, contiguous, minimising the slowest stage's time within each device's memory.

    ``block_s``: each block's forward + backward time. ``stage_bytes(stage, i, j)``: memory stage
    ``stage`` needs holding blocks i..j-1 (its in-flight activations depend on its place in the
    pipeline); splits with a stage over ``capacity`` are never chosen. Raises ValueError when no
    split fits.
    """
    fits = None
    if capacity is not None and stage_bytes is not None:
        fits = lambda stage, i, j: stage_bytes(stage, i, j) <= capacity
    sizes = _min_max_split(block_s, stages, fits)
    if sizes is None:
        n = len(block_s)
        raise ValueError(f"no contiguous split of {n} blocks into {stages} stages fits {capacity / 2**30:.1f} GiB")
    return sizes


def stage_blocks(model: BlockModel, stages: int, split: list[int] | None = None) -> list[list[str]]:
    """Block names of each stage: the seams mp and pp both cut at."""
    names = model.block_names()
    sizes = split if split is not None else balanced_split(model.block_params(), stages)
    out, start = [], 0
    for size in sizes:
        out.append(names[start : start + size])
        start += size
    return out
