"""--strategy tp: the whole model on every rank, each layer's matrices split over all ranks."""

from __future__ import annotations

import contextlib

import torch

from core.config import RunConfig
from core.models import BlockModel
from core.models.base import held_buffers
from core.parallel.data_parallel import replicate_over_dp
from core.parallel.distributed import DistState, full_tensor
from core.training.strategy import Built, autocast
from tp.comm import CommCounter
from tp.plan import apply_tp


def loss_context(cfg: RunConfig):
    if cfg.loss_parallel:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def eager_if(flag: bool):
    """Compiled blocks run uncompiled inside (torch.compiler.set_stance, torch >= 2.6)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if flag and stance else contextlib.nullcontext()


def build_tp(model: BlockModel, cfg: RunConfig, state: DistState) -> Built:
    device = state.device
    model.to(device)
    apply_tp(model, state.submesh("tp"), cfg)
    run = replicate_over_dp(model, state)  # FSDP2 over "dp": 2-D (dp, tp) parameters
    layer = model.tp_layer  # the layer result.json reports collectives for, if the model names one
    comm: dict = {}

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # count the collectives of the first step only: counting costs a dispatch per op. That
        # step runs eagerly: torch.compile does not trace under a dispatch mode (CommDebugMode)
        counter = CommCounter() if not comm else contextlib.nullcontext()
        with counter, eager_if(bool(cfg.compile and not comm)):
            with autocast(cfg, device):
                out = run(x)
            with loss_context(cfg):
                loss = model.loss(out, y)
                loss.backward()
        if not comm:
            comm.update(counter.summary(layer_suffix=layer))
        return full_tensor(loss.detach())

    @torch.no_grad()
    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(cfg, device):
            return full_tensor(run(x))

    def extras() -> dict:
        return {
            "tp": state.layout.tp,
            "sequence_parallel": cfg.sequence_parallel,
            "loss_parallel": cfg.loss_parallel,
            "communication_first_step": comm,
        }

    return Built(
        list(model.named_parameters()),
        step,
        predict,
        device,
        device,
        [device],
        model.train,
        result_extras=extras,
        buffers=held_buffers(model),  # replicated: every tensor rank computes the same statistics
    )
