"""The contract between the training loop and a parallel style.

A style's build function takes the model (on CPU, full), the run configuration and the
distributed state, and returns a ``Built``: the training loop needs nothing else from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core.config import RunConfig
from core.models.base import held_buffers
from core.parallel.distributed import full_tensor


@dataclass
class Built:
    params: list[tuple[str, nn.Parameter]]
    """This rank's parameters, named as in the full model (``blocks.fc1.weight``)."""
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """Forward and backward of one batch; returns the batch's mean loss (detached), on every rank."""
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
    """Model outputs for (inputs, targets) in eval mode, on the rank(s) that hold them; None elsewhere."""
    input_device: torch.device
    target_device: torch.device
    devices: list[torch.device]
    """Devices whose peak memory this rank reports (mp: all of its stages' devices)."""
    train_mode: Callable[[bool], None]
    result_extras: Callable[[], dict] = field(default=lambda: {})
    """Strategy-specific result.json fields (schedule, bubble, communication counts)."""
    after_step: Callable[[int], None] = field(default=lambda step: None)
    """Called after each optimizer step with its index (timeline recording, ...)."""
    save_artifacts: Callable[[str], None] = field(default=lambda folder: None)
    """Writes strategy files (timeline.json/png) into the run folder, on every rank."""
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    """This rank's persistent buffers (batch-norm statistics, ...), named as in the full model: state
    like the parameters, checkpointed, exported and compared by --check. Data-parallel replicas hold
    equal copies (core.parallel.data_parallel.sync_buffers)."""
    microbatches: int = 1
    """Pieces each replica's batch is computed in (pp's micro-batches): --check cuts the same way
    for models whose layers couple the samples of a batch (batch norm)."""

    def named_full_grads(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) gradient of every local parameter, on CPU, for the parity check."""
        out = {}
        for name, p in self.params:
            g = p.grad
            if g is None:
                g = torch.zeros_like(p)
            out[name] = full_tensor(g).detach().float().cpu()
        return out


def autocast(cfg: RunConfig, device: torch.device):
    """bf16 autocast when asked; fp32 runs with TF32 off (set in core.training.train)."""
    if cfg.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def single_device_build(
    model: nn.Module, cfg: RunConfig, device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None
) -> Built:
    """The whole model on one device: the reference strategy, and the parity check's twin.
    ``wrap`` returns what runs the model (data parallel: its FSDP2 or DDP form)."""
    model.to(device)
    run = wrap(model) if wrap else model

    def step(x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale``: the share of a batch this piece is (--check runs a batch-norm model's batch in
        the pipeline's pieces); the mean loss of the piece is returned unscaled."""
        with autocast(cfg, device):
            out = run(x)
        loss = model.loss(out, y)
        (loss if scale == 1.0 else loss * scale).backward()
        return loss.detach()

    @torch.no_grad()
    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(cfg, device):
            return run(x)

    return Built(
        list(model.named_parameters()),
        step,
        predict,
        device,
        device,
        [device],
        model.train,
        buffers=held_buffers(model),
    )
