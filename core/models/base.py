"""The block model every style cuts: an ordered ModuleDict whose forward runs the blocks it holds.

A stage (mp or pp) is the same class holding a subset of the blocks, so checkpoints and parameter
names (``blocks.fc1.weight``) are identical whatever the cut. Models know nothing of parallelism.

A model also carries what only it knows, as class attributes and methods the suite reads instead
of asking for its name: its loss, default batch size, learning rate, optimizer and dataset, whether
it is a classifier (evaluation reports accuracy), its tensor-parallel plan (as data) and, for
``--dataset synthetic``, its synthetic data. README "Your own model" is the contract.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from core.data import Dataset

Seam = torch.Tensor | tuple[torch.Tensor, ...]
"""What crosses a seam between blocks: one tensor, or a tuple of tensors (passed on as ONE argument)."""


class BlockModel(nn.Module):
    """Blocks in order; forward skips absent ones (torchtitan's composability rule)."""

    default_batch_size: ClassVar[int] = 16
    default_lr: ClassVar[float] = 1e-3
    default_epochs: ClassVar[int] = 1
    """Passes over the training set when neither --epochs nor --steps is given."""
    default_dataset: ClassVar[str] = "synthetic"
    datasets: ClassVar[tuple[str, ...]] = ("synthetic",)
    """Built-in datasets this model trains on (a dataset given by import path is always accepted)."""
    optimizer: ClassVar[tuple[type, dict]] = (torch.optim.SGD, {})
    """(class, keyword arguments) besides the learning rate; ``"fused": True`` means fused where possible."""
    classifier: ClassVar[bool] = False
    """Outputs class scores on dim 1: evaluation reports accuracy."""
    image_shape: ClassVar[tuple[int, int, int] | None] = None
    """(C, H, W) of the images an image model takes: image datasets are shaped to it."""
    num_classes: ClassVar[int | None] = None
    tp_layer: ClassVar[str | None] = None
    """One layer whose collectives result.json reports per layer (tensor parallel)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict()

    def forward(self, *inputs: torch.Tensor) -> Seam:
        # a pipeline stage receives a tuple from the previous stage as separate arguments: join them,
        # so a block sees the same value whether its predecessor ran here or on another rank
        x: Seam = inputs[0] if len(inputs) == 1 else inputs
        for block in self.blocks.values():
            x = block(x)
        return x

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (pipelining's scale_grads=True assumes a mean)."""
        raise NotImplementedError

    def tp_plan(self, sequence_parallel: bool = False, loss_parallel: bool = False) -> dict | None:
        """Module names -> torch tensor-parallel styles; None: the model cannot be tensor parallel."""
        return None

    def tp_refusal(self, tp: int, sequence_parallel: bool, loss_parallel: bool, in_pipeline: bool) -> str | None:
        """Why this model cannot run its plan at this degree (one line), or None."""
        if sequence_parallel or loss_parallel:
            return (
                f"--sequence-parallel and --loss-parallel need a plan written for them; {type(self).__name__}'s is not"
            )
        return None

    def synthetic_data(self, batch_size: int, seed: int) -> Dataset:
        """``--dataset synthetic``: data shaped for this model (train and a held-out tail)."""
        raise NotImplementedError(f"{type(self).__name__} has no synthetic data: give --dataset")

    def optimizer_state_copies(self) -> int:
        """Copies of each parameter the optimizer keeps (memory estimates): Adam's two moments,
        SGD's momentum buffer."""
        cls, kwargs = self.optimizer
        if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
            return 2
        return 1 if kwargs.get("momentum") else 0

    def block_names(self) -> list[str]:
        return list(self.blocks.keys())

    def block_params(self) -> list[int]:
        return [sum(p.numel() for p in b.parameters()) for b in self.blocks.values()]

    def uncut_names(self) -> dict[str, str]:
        """State-dict keys of this block model -> the keys of the model it was cut from, where they
        differ (torchvision's ``layer1.0.conv1.weight`` for ``blocks.layer1_0.conv1.weight``):
        ``--export`` writes the uncut model's names, so the file loads strictly into it. Empty: the
        block model is the uncut model."""
        return {}

    def outside_params(self) -> list[str]:
        """Parameters that belong to no block (used by ``loss``): they live with the last stage."""
        return [n for n, _ in self.named_parameters() if not n.startswith("blocks.")]

    def keep_only(self, names: list[str], with_outside: bool = True) -> BlockModel:
        """A copy holding only ``names`` (a stage); parameter names stay those of the full model.

        Only the kept blocks are copied, so cutting a large model costs one stage's memory; they are
        copied together, so weights tied between them stay tied. ``with_outside=False`` drops the
        parameters outside the blocks (the loss's: only the last stage computes it).
        """
        blocks = self.blocks
        self.blocks = nn.ModuleDict()
        try:
            stage = copy.deepcopy(self)
        finally:
            self.blocks = blocks
        kept = copy.deepcopy([blocks[n] for n in names])  # one memo: ties between kept blocks survive
        for name, block in zip(names, kept):
            stage.blocks[name] = block
        if not with_outside:
            for module in stage.modules():
                if module is not stage.blocks and not _inside(module, stage.blocks):
                    for pname in list(module._parameters):
                        module.register_parameter(pname, None)
        return stage


def _inside(module: nn.Module, blocks: nn.ModuleDict) -> bool:
    return any(module is m for m in blocks.modules())


def tied_groups(model: BlockModel) -> list[list[tuple[str, str]]]:
    """Parameters shared between blocks: for each shared tensor, its (block, parameter name) pairs."""
    seen: dict[int, list[tuple[str, str]]] = {}
    for block_name, block in model.blocks.items():
        for pname, p in block.named_parameters(remove_duplicate=False):
            owners = seen.setdefault(id(p), [])
            if block_name not in (b for b, _ in owners):
                owners.append((block_name, f"blocks.{block_name}.{pname}"))
    return [owners for owners in seen.values() if len(owners) > 1]


def held_buffers(module: nn.Module, with_outside: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The persistent buffers of ``module`` (what ``state_dict`` keeps besides parameters: batch-norm
    running statistics, a user's running average or step counter), named as in the full model.
    ``with_outside=False``: only the blocks' (a pipeline stage that is not the last: what lies
    outside the blocks belongs to the last stage, like the parameters there)."""
    out = []
    for mname, m in module.named_modules():
        for bname, b in m._buffers.items():
            if b is None or bname in m._non_persistent_buffers_set:
                continue
            name = f"{mname}.{bname}" if mname else bname
            if with_outside or name.startswith("blocks."):
                out.append((name, b))
    return out


def to_block_names(model: BlockModel, state: dict) -> dict:
    """A state dict in the block model's names, whether it came in those or in the uncut model's
    (an ``--export`` of a torchvision model): what ``--init-from`` loads."""
    back = {uncut: own for own, uncut in model.uncut_names().items()}
    if back and not any(k in model.state_dict() for k in state):
        return {back.get(k, k): v for k, v in state.items()}
    return state


def batch_coupled(model: nn.Module) -> bool:
    """Layers whose output for one sample depends on the others in its batch (batch norm): a
    pipeline's micro-batches then differ from one big batch, and --check cuts its batch the same way."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
