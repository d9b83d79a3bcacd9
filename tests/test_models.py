"""Models: block structure, the balanced cut, stage copies, and parallel-agnosticism."""

from __future__ import annotations

import ast
import os

import pytest
import torch

from core.models import build_model, count_blocks
from core.parallel.partition import balanced_split, stage_blocks


@pytest.mark.parametrize("name,flavor", [("mnist-cnn", "tiny"), ("gpt", "tiny"), ("delay", "tiny")])
def test_count_blocks_matches_built_model(name, flavor):
    assert len(build_model(name, flavor).blocks) == count_blocks(name, flavor)


def test_mnist_cnn_is_the_notebooks_network_layer_for_layer():
    m = build_model("mnist-cnn")
    kinds = [type(mod).__name__ for mod in m.modules() if not list(mod.children())]
    assert kinds == [
        "Conv2d",
        "Dropout2d",
        "Conv2d",
        "Dropout2d",
        "MaxPool2d",
        "Flatten",
        "Linear",
        "Linear",
        "Linear",
        "LogSoftmax",
    ]
    assert m.blocks.fc1.in_features == 9216 and m.blocks.fc2.out_features == 20
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_balanced_split_minimises_largest_stage_and_covers_every_block():
    params = [320, 18496, 0, 1179776, 2580, 210]  # mnist-cnn's blocks
    sizes = balanced_split(params, 3)
    assert sum(sizes) == 6 and all(s >= 1 for s in sizes)
    # fc1 holds 97% of the parameters: it must be alone in its stage
    assert sizes == [3, 1, 2]
    assert balanced_split([1] * 8, 4) == [2, 2, 2, 2]


def test_stage_copy_keeps_full_model_parameter_names():
    m = build_model("gpt", "tiny")
    names = stage_blocks(m, 3)
    stage = m.keep_only(names[1])
    assert set(stage.blocks) == set(names[1])
    full = dict(m.named_parameters())
    for n, p in stage.named_parameters():
        assert torch.equal(p, full[n]) and p.data_ptr() != full[n].data_ptr()


def test_explicit_split_reproduces_a_given_placement():
    m = build_model("mnist-cnn")
    assert stage_blocks(m, 3, [2, 1, 3]) == [["conv1", "conv2"], ["pool"], ["fc1", "fc2", "fc3"]]


def test_models_import_nothing_from_the_parallel_packages():
    root = os.path.join(os.path.dirname(__file__), "..", "core")
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                        for mod in mods:
                            assert mod.split(".")[0] not in ("mp", "pp", "tp", "jobs"), f"{f} imports {mod}"


def test_gpt_attention_runs_with_fewer_local_heads():
    # a column-split q/k/v leaves heads/tp heads per rank: the reshape must infer them
    m = build_model("gpt", "tiny")
    layer = m.blocks.h0.attn
    half = torch.nn.Linear(32, 16, bias=False)
    layer.q, layer.k, layer.v = half, half, half
    layer.o = torch.nn.Linear(16, 32, bias=False)
    assert layer(torch.randn(2, 16, 32)).shape == (2, 16, 32)


def test_delay_model_waits_forward_and_twice_that_backward():
    import time

    m = build_model("delay", "tiny")
    x = torch.randn(4, 16, requires_grad=True)
    t0 = time.perf_counter()
    out = m(x)
    t1 = time.perf_counter()
    out.sum().backward()
    t2 = time.perf_counter()
    f = sum(m.flavor.forward_ms(i, len(x)) for i in range(m.flavor.blocks)) / 1000  # per sample: 4 samples
    assert t1 - t0 >= f and t2 - t1 >= 2 * f  # sleeps are lower bounds; no upper bound (shared machine)
    assert all(p.grad is not None for p in m.parameters())


def test_nothing_outside_the_models_branches_on_a_model_name():
    # a model carries what only it knows (core.models.base.BlockModel): no `cfg.model == "gpt"`
    root = os.path.join(os.path.dirname(__file__), "..")
    for package in ("core", "mp", "pp", "tp", "jobs"):
        for folder, _, files in os.walk(os.path.join(root, package)):
            if os.path.basename(folder) == "models":
                continue
            for f in (f for f in files if f.endswith(".py")):
                tree = ast.parse(open(os.path.join(folder, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Compare):
                        operands = [node.left, *node.comparators]
                        named = [o for o in operands if isinstance(o, ast.Attribute) and o.attr == "model"]
                        assert not named, f"{folder}/{f}:{node.lineno} compares the model's name"


def test_models_come_from_one_registry_of_import_paths(tmp_path, monkeypatch):
    from core.models import describe
    from core.models.registry import MODELS, model_factory

    for name, path in MODELS.items():
        module, _, attr = path.partition(":")
        assert model_factory(name) is getattr(__import__(module, fromlist=[attr]), attr)
        assert next(describe(name, "tiny").parameters()).is_meta  # checked on the host without memory
    # a user's factory is found the same way, by its import path
    (tmp_path / "tiny_user.py").write_text(
        "from torch import nn\nfrom core.models import BlockModel\n"
        "class M(BlockModel):\n"
        "    default_batch_size = 5\n"
        "    def __init__(self):\n        super().__init__()\n        self.blocks['a'] = nn.Linear(2, 2)\n"
        "def make(flavor):\n    return M()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from helpers import cfg

    assert cfg(model="tiny_user:make").resolved_batch_size == 5  # the model's own default
