"""Vanilla model parallelism: on CPU it must equal the single-device reference exactly."""

from __future__ import annotations

import torch

from core.data import Dataset, Split
from core.models import build_model
from core.training.train import run
from jobs.plan.strategies import get_build
from mp import place_layers

from helpers import cfg, one_process, small_mnist


def _train(strategy: str, gpus: int, data: Dataset, **kw):
    c = cfg(strategy=strategy, gpus=gpus, steps=4, batch_size=32, **kw)
    return run(c, one_process(c), get_build(strategy), dataset=data)


def test_mp_equals_reference_bit_for_bit_on_cpu():
    data = small_mnist()
    ref = _train("reference", 1, data)
    for gpus in (2, 3, 6):
        mp = _train("mp", gpus, data)
        # same weights, same batches, same kernels: no reduction changes order, so exact equality
        assert mp["losses"] == ref["losses"], gpus
        assert mp["eval_accuracy"] == ref["eval_accuracy"]


def test_mp_check_reports_zero_difference():
    result = _train("mp", 3, small_mnist(), check=True)
    c = result["check"]
    assert c["passed"] and c["max_loss_abs_diff"] == 0.0 and c["max_grad_rel_diff"] == 0.0
    assert c["steps_compared"] == 4


def test_place_layers_routes_activations_and_gradients_across_stages():
    torch.manual_seed(0)
    m = build_model("mnist-cnn", dropout=False)
    twin = build_model("mnist-cnn", dropout=False)
    twin.load_state_dict(m.state_dict())
    stages = place_layers(m, [torch.device("cpu")] * 3, [2, 2, 2])
    assert stages == [["conv1", "conv2"], ["pool", "fc1"], ["fc2", "fc3"]]
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    m.loss(m(x), y).backward()
    twin.loss(twin(x), y).backward()
    for (n, p), (_, q) in zip(m.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_mp_learns_real_mnist_digits(shared_mnist):
    """Train on 8,000 real test-split digits, evaluate on the other 2,000: well above chance (10%)."""
    from core.data import _read_idx_split

    digits = _read_idx_split(shared_mnist, "t10k")
    data = Dataset(Split(digits.x[:8000], digits.y[:8000]), Split(digits.x[8000:], digits.y[8000:]), "t10k split")
    c = cfg(strategy="mp", gpus=3, epochs=2, batch_size=64, lr=0.005)  # with momentum 0.9: 0.05 without
    result = run(c, one_process(c), get_build("mp"), dataset=data)
    assert result["eval_samples"] == 2000
    assert result["eval_accuracy"] > 0.7, result["eval_accuracy"]
    assert result["losses"][-1] < result["losses"][0]
