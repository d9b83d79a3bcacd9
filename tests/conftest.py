"""Shared fixtures: the repo on sys.path, the real MNIST test split when ../shared/data has it."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


@pytest.fixture
def shared_mnist() -> str:
    """The folder holding MNIST/raw/t10k-* (10,000 real test digits), or skip."""
    if not os.path.exists(os.path.join(SHARED_DATA, "MNIST", "raw", "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"real MNIST test split not found in {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    import torch

    n = torch.cuda.device_count()
    for item in items:
        mark = item.get_closest_marker("gpu")
        if mark is not None:
            need = mark.kwargs.get("gpus", 1)
            if n < need:
                item.add_marker(pytest.mark.skip(reason=f"needs {need} GPU(s), found {n}"))
