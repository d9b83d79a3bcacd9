"""Measure each block of a model: forward and backward time of one micro-batch, activation memory.

What ``--balance time`` balances (core.parallel.partition). Blocks run one at a time on the target device,
in order, each fed the previous block's output, so a model larger than one device can still be
measured (only one block is on the device at a time; torchgpipe's ``balance_by_time`` needs the
whole model on one device). The last block's backward starts from the model's loss, because the
loss (gpt: cross-entropy over 50,304 classes) runs on the last stage and costs what it costs.

Profiling must leave no trace on training: random state (dropout) is forked and restored,
buffers are restored, and the gradients it made are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from core.models.base import BlockModel
from core.training.strategy import autocast

# The first call pays for allocations and lazy init (cuBLAS handles); then the fastest of up to 5
# calls, fewer when a block is slow (a delay block on a whole batch): 0.2 s of measuring is enough.
# The fastest, not the mean: noise (another process on the core, a late wake-up) only ever adds.
WARMUP, REPEATS, BUDGET_S = 1, 5, 0.2


@dataclass(frozen=True)
class BlockCost:
    name: str
    forward_s: float
    backward_s: float
    activation_bytes: int
    """Bytes autograd saves for backward in one micro-batch's forward (parameters excluded)."""
    param_bytes: int

    @property
    def time_s(self) -> float:
        return self.forward_s + self.backward_s


class _SavedBytes:
    """Counts what autograd keeps for backward (saved_tensors_hooks): the activation memory."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.seen, self.bytes = params, set(), 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.data_ptr() not in self.params and key not in self.seen:
            self.seen.add(key)
            # a slice of a larger tensor (the first block's input, a view of the whole data set)
            # keeps its storage alive, but only its own rows are the micro-batch's cost
            self.bytes += min(key[1], t.numel() * t.element_size())
        return t


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _time_block(block: nn.Module, x: torch.Tensor, device: torch.device, loss_of, cfg) -> tuple:
    """(forward s, backward s, activation bytes, output) of one micro-batch through ``block``."""
    fwd, bwd, saved, out = [], [], 0, x
    params = {p.data_ptr() for p in block.parameters()}
    spent = 0.0
    for i in range(WARMUP + REPEATS):
        if i > WARMUP and spent >= BUDGET_S:
            break
        inp = _fresh(x)
        counter = _SavedBytes(params)
        t0 = _sync(device)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), autocast(cfg, device):
            out = block(inp)
            head = loss_of(out) if loss_of else out
        t1 = _sync(device)
        if loss_of and head.requires_grad:
            head.backward()
        elif not loss_of:  # a seam may carry (nested) tuples of tensors (README "Your own model")
            outs = [t for t in tree_leaves(head) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
        t2 = _sync(device)
        if i >= WARMUP:
            spent += t2 - t0
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            saved = counter.bytes
    return min(fwd), min(bwd), saved, _detached(out)


def _fresh(x):
    """A block's input as a pipeline stage receives it: detached leaves that require grad."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()), x)


def _detached(x):
    return tree_map_only(torch.Tensor, torch.Tensor.detach, x)


def profile_blocks(model: BlockModel, x: torch.Tensor, y: torch.Tensor, device: torch.device, cfg) -> list[BlockCost]:
    """Every block's cost on ``device`` for the micro-batch (x, y); the model is left as it was."""
    costs = []
    names = model.block_names()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws here must not shift training's
        x, y = x.to(device), y.to(device)
        for i, name in enumerate(names):
            block = model.blocks[name]
            home = next((p.device for p in block.parameters()), torch.device("cpu"))
            buffers = {k: v.detach().clone() for k, v in block.named_buffers()}
            block.to(device)
            last = i == len(names) - 1
            loss_of = (lambda out: model.loss(out, y)) if last else None
            f, b, act, x = _time_block(block, x, device, loss_of, cfg)
            for p in block.parameters():
                p.grad = None
            with torch.no_grad():
                for k, v in block.named_buffers():
                    v.copy_(buffers[k])
            block.to(home)
            param_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
            costs.append(BlockCost(name, f, b, act, param_bytes))
    for p in model.parameters():  # the loss's own parameters (outside the blocks) got gradients too
        p.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the profile's blocks back before the stages are built
    return costs
