"""Models by name or import path (core.models.registry). They import nothing from mp/pp/tp: each
style cuts or shards them from outside, reading what it needs from the model itself."""

from __future__ import annotations

from core.models.base import BlockModel
from core.models.registry import build_model, describe

__all__ = ["BlockModel", "build_model", "count_blocks", "describe"]


def count_blocks(name: str, flavor: str) -> int:
    return len(describe(name, flavor).blocks)
