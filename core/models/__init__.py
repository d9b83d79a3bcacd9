"""Models by name. They import nothing from mp/pp/tp: each style cuts or shards them from outside."""

from __future__ import annotations

from core.models.base import BlockModel
from core.models.delay import DELAY_FLAVORS, DelayModel
from core.models.gpt import GPT, GPT_FLAVORS
from core.models.mnist_cnn import MnistCNN

__all__ = ["BlockModel", "build_model", "count_blocks", "FLAVORS"]

FLAVORS = {"mnist-cnn": {"tiny": None}, "gpt": GPT_FLAVORS, "delay": DELAY_FLAVORS}


def build_model(name: str, flavor: str = "tiny", dropout: bool = True) -> BlockModel:
    """Build on CPU; every rank that builds with the same seed gets the same weights."""
    if name == "mnist-cnn":
        return MnistCNN(dropout=dropout)
    if name == "gpt":
        return GPT(flavor)
    if name == "delay":
        return DelayModel(flavor)
    raise ValueError(f"unknown model {name!r}")


def count_blocks(name: str, flavor: str) -> int:
    if name == "mnist-cnn":
        return 6
    if name == "gpt":
        return GPT_FLAVORS[flavor].layers + 2
    return DELAY_FLAVORS[flavor].blocks
