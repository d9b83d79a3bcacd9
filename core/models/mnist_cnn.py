"""The notebook's MNIST network, layer for layer.

Conv2d(1,32,3,1), Dropout2d(0.5), Conv2d(32,64,3,1), Dropout2d(0.75), max-pool 2, flatten,
Linear(9216,128), Linear(128,20), Linear(20,10), log-softmax. The notebook has NO activation
functions between layers; we stay faithful (the network is then affine up to the max-pool, and
still learns MNIST well above chance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.models.base import BlockModel


class MnistCNN(BlockModel):
    # The notebook's batch. Its SGD at lr 1e-3 for one epoch ends at 17.7% (offline digits): the
    # network learns, too slowly to show it. Momentum 0.9 at lr 0.03 for two epochs reaches 91.9%
    # on the same digits (91.9% on the 10,000-digit test split) with the parity check passing;
    # one epoch of anything tried stayed below 90% (best 89.7%), lr 0.2 without momentum diverged.
    default_batch_size = 128
    default_lr = 0.03
    default_epochs = 2
    optimizer = (torch.optim.SGD, {"momentum": 0.9})
    default_dataset = "mnist"
    datasets = ("mnist",)
    classifier = True
    image_shape = (1, 28, 28)
    num_classes = 10

    def __init__(self, dropout: bool = True) -> None:
        super().__init__()
        p1, p2 = (0.5, 0.75) if dropout else (0.0, 0.0)
        self.blocks["conv1"] = nn.Sequential(nn.Conv2d(1, 32, 3, 1), nn.Dropout2d(p1))
        self.blocks["conv2"] = nn.Sequential(nn.Conv2d(32, 64, 3, 1), nn.Dropout2d(p2))
        self.blocks["pool"] = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(1))
        self.blocks["fc1"] = nn.Linear(9216, 128)
        self.blocks["fc2"] = nn.Linear(128, 20)
        self.blocks["fc3"] = nn.Sequential(nn.Linear(20, 10), nn.LogSoftmax(dim=1))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(output, target)

    def tp_plan(self, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict | None:
        """The notebook's picture: Linear(9216,128) split by columns (y = [X A_0, X A_1]), then
        Linear(128,20) split by rows so one all-reduce joins the halves: the activations between
        fc1 and fc2 are sharded on the feature dimension, replicated everywhere else. The
        convolutions stay replicated: their weights are 0.3% of the parameters."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        return {"blocks.fc1": ColwiseParallel(), "blocks.fc2": RowwiseParallel()}

    def tp_refusal(self, tp: int, sequence_parallel: bool, loss_parallel: bool, in_pipeline: bool) -> str | None:
        if 128 % tp or 9216 % tp:
            return f"tensor parallel {tp} does not divide mnist-cnn's Linear(9216,128): use 1, 2, 4, 8..."
        return super().tp_refusal(tp, sequence_parallel, loss_parallel, in_pipeline)


def build(flavor: str = "tiny") -> MnistCNN:
    return MnistCNN()


build.flavors = ("tiny",)
