"""The single-device reference and the parity comparison behind ``--check``.

The checker holds a copy of the model taken before a style cuts or shards it, so both start from
the same weights. Each step it runs that copy on the same batch on one device and compares the
style's loss and every parameter's gradient with it. After the style's optimizer step the copy
takes its own optimizer step and then the style's new weights for the parameters this rank
holds, so every step is compared from (nearly) identical weights and rounding differences do not
compound over a long run. Parameters held by other ranks follow the reference's own updates,
which differ from theirs only by rounding. Dropout is disabled in checked runs: its masks
depend on how a batch is cut.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from core.config import RunConfig
from core.distributed import DistState, all_max, full_tensor
from core.strategy import Built, single_device_build


def build_reference(model: nn.Module, cfg: RunConfig, state: DistState) -> Built:
    """--strategy reference (and dp): the whole model on this process's device, one replica of --dp."""
    from core.data_parallel import replicate_over_dp

    return single_device_build(model, cfg, state.device, wrap=lambda m: replicate_over_dp(m, state))


def grad_rel_diff(grad: torch.Tensor, ref: torch.Tensor) -> float:
    """||grad - ref|| / ||ref|| for one parameter (L2 over all its elements).

    Norm-relative rather than element-wise: an element-wise ratio explodes on entries that are
    zero up to rounding, and a bias gradient summed over 80,000 positions (conv1 of mnist-cnn)
    legitimately moves by a few 1e-6 of its largest entry when the batch is summed in another order.
    """
    scale = ref.norm().clamp_min(1e-30)
    return float(((grad - ref).norm() / scale).item())


@dataclass
class CheckSummary:
    max_loss_abs_diff: float = 0.0
    max_grad_rel_diff: float = 0.0
    tolerance: float = 0.0
    steps: int = 0
    worst_param: str = ""

    @property
    def passed(self) -> bool:
        return self.steps > 0 and self.max_loss_abs_diff <= self.tolerance and self.max_grad_rel_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_loss_abs_diff": self.max_loss_abs_diff,
            "max_grad_rel_diff": self.max_grad_rel_diff,
            "tolerance": self.tolerance,
            "steps_compared": self.steps,
            "worst_param": self.worst_param,
        }


class ParityChecker:
    def __init__(self, model: nn.Module, cfg: RunConfig, state: DistState, make_optimizer) -> None:
        self.cfg, self.state = cfg, state
        self.ref = single_device_build(copy.deepcopy(model), cfg, state.device)
        self.opt = make_optimizer([p for _, p in self.ref.params])
        self.summary = CheckSummary(tolerance=cfg.resolved_tol)
        self._losses: list[torch.Tensor] = []

    def micro_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dev = self.state.device
        self._losses.append(self.ref.step(x.to(dev), y.to(dev)))

    def compare(self, loss: float, built: Built, accum: int) -> None:
        """After a full (accumulated) step: compare the loss and this rank's gradients."""
        ref_loss = float(torch.stack(self._losses).mean().item())
        self._losses.clear()
        ref_params = dict(self.ref.params)
        if accum > 1:
            for p in ref_params.values():
                if p.grad is not None:
                    p.grad.div_(accum)
        worst, worst_name = 0.0, ""
        for name, grad in built.named_full_grads().items():
            ref = ref_params[name].grad
            ref = torch.zeros_like(grad) if ref is None else ref.detach().float().cpu()
            d = grad_rel_diff(grad, ref)
            if d > worst:
                worst, worst_name = d, name
        loss_diff = abs(loss - ref_loss)
        # the worst over all ranks: each rank compares the parameters it holds
        worst = all_max(worst, self.state)
        loss_diff = all_max(loss_diff, self.state)
        s = self.summary
        if worst > s.max_grad_rel_diff:
            s.worst_param = worst_name
        s.max_grad_rel_diff = max(s.max_grad_rel_diff, worst)
        s.max_loss_abs_diff = max(s.max_loss_abs_diff, loss_diff)
        s.steps += 1
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sync_weights(self, built: Built) -> None:
        """After both optimizer steps: take the style's weights for the parameters this rank holds."""
        ref_params = dict(self.ref.params)
        for name, p in built.params:
            ref_params[name].copy_(full_tensor(p).detach().to(ref_params[name].device))
