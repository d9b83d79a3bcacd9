"""The single-device reference and the parity comparison behind ``--check``.

The checker holds a copy of the model taken before a style cuts or shards it, so both start from
the same weights. Each step it runs that copy on the same batch on one device and compares the
style's loss and every parameter's gradient with it. Then both take their optimizer step: the
copy its own optimizer (same class, same state) on its own gradients, and the UPDATES are
compared too (the style's new weights against the copy's), so a wrong optimizer step in the
style (a wrong learning rate, a missed parameter) fails the check. Only then does the copy take
the style's new weights, all of them (each rank's gathered to every rank), so every step is
compared from identical weights and rounding differences do not compound over a long run.
Buffers (batch-norm running statistics, a user's running averages) are state like the weights:
after each step the style's are compared with the copy's and then taken by it. Every random
layer is switched off in checked runs (core.models.randomness): its draws depend on how a batch
is cut. A model with batch norm sees per-micro-batch statistics in a pipeline, and a model with
buffers updates them once per piece: the copy then runs the same pieces of the batch one after
another, and keeps the buffers replica 0 ended with, as data-parallel replicas do
(core.parallel.data_parallel.sync_buffers).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from core.config import RunConfig
from core.models.base import batch_coupled, held_buffers
from core.parallel.data_parallel import replicate_over_dp
from core.parallel.distributed import DistState, all_max, full_tensor, gather_named, worst_across
from core.training.strategy import Built, single_device_build


def build_reference(model: nn.Module, cfg: RunConfig, state: DistState) -> Built:
    """--strategy reference (and dp): the whole model on this process's device, one replica of --dp."""
    return single_device_build(model, cfg, state.device, wrap=lambda m: replicate_over_dp(m, state))


def grad_rel_diff(grad: torch.Tensor, ref: torch.Tensor) -> float:
    """||grad - ref|| / ||ref|| for one parameter (L2 over all its elements).

    Norm-relative rather than element-wise: an element-wise ratio explodes on entries that are
    zero up to rounding, and a bias gradient summed over 80,000 positions (conv1 of mnist-cnn)
    legitimately moves by a few 1e-6 of its largest entry when the batch is summed in another order.
    """
    scale = ref.norm().clamp_min(1e-30)
    return float(((grad - ref).norm() / scale).item())


def update_rel_diff(new: torch.Tensor, ref_new: torch.Tensor, ref_old: torch.Tensor) -> float:
    """||excess|| / ||ref_new - ref_old||: how far the style's update is from the reference's,
    relative to the reference's update.

    Relative to the update, not the weight: a weight is far larger than one step's change, so a
    10x learning rate moves ||new - ref_new|| / ||weight|| by less than a gradient tolerance, while
    relative to the update it shows as 9. ``excess`` is each element's difference beyond one unit
    in the last place of the stored weight (``new``'s dtype): both sides round their new weight
    to that grid, so one ulp apart is storage, not the optimizer. Without that allowance SGD at
    lr 1e-3 failed the check on rounding alone: mnist-cnn's conv1 bias (|w| ~ 0.2, ulp 1.5e-8)
    moves ~1e-6 a step, so one element rounded the other way reads as 1e-3 of the update
    (measured 1.33e-3, pp 3, quick start). A parameter neither side moved compares as 0."""
    mag = new.detach().abs()
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    excess = ((new.double() - ref_new.double()).abs() - ulp).clamp_min(0.0).norm()
    step = (ref_new.double() - ref_old.double()).norm()
    if float(step) == 0.0:
        return 0.0 if float(excess) == 0.0 else float("inf")
    return float((excess / step).item())


def buffer_rel_diff(buf: torch.Tensor, ref: torch.Tensor) -> float:
    """||buf - ref|| / ||ref|| for a floating buffer; 0 or inf for an integer one (a counter is
    right or wrong)."""
    if not buf.is_floating_point():
        return 0.0 if torch.equal(buf, ref) else float("inf")
    return grad_rel_diff(buf.double(), ref.double())


@dataclass
class CheckSummary:
    max_loss_abs_diff: float = 0.0
    max_grad_rel_diff: float = 0.0
    max_param_rel_diff: float = 0.0
    """Worst parameter after the optimizer step, relative to the reference's update (update_rel_diff)."""
    max_buffer_rel_diff: float = 0.0
    """Worst persistent buffer after the step (batch-norm statistics, ...), ||style - ref|| / ||ref||."""
    tolerance: float = 0.0
    steps: int = 0
    worst_param: str = ""
    worst_param_after_step: str = ""
    worst_buffer: str = ""
    buffers: int = 0
    """Persistent buffers of the model, compared after every step."""

    @property
    def passed(self) -> bool:
        return (
            self.steps > 0
            and self.max_loss_abs_diff <= self.tolerance
            and self.max_grad_rel_diff <= self.tolerance
            and self.max_param_rel_diff <= self.param_tolerance
            and self.max_buffer_rel_diff <= self.tolerance
        )

    @property
    def param_tolerance(self) -> float:
        """Updates are compared 100x looser than gradients, at most 0.1: an adaptive optimizer
        (Adam) divides each element by its running gradient magnitude, so an element whose gradient
        is rounding noise moves a full step either way (gpt tiny, tp 2, loss parallel: gradients
        5e-7 apart, updates 3.5e-5, measured). A wrong learning rate shows as |factor - 1|: a 10x
        rate gives 9, a 1.2x rate 0.2, far outside. SGD's update is lr x gradient: its difference
        is the gradient's, well inside. bf16 (gradients ~1e-2 apart) moves more elements' Adam
        steps by noise: gpt tiny tp 2 on 2 H200s measured 0.35 with gradients 8.6e-3 apart, so the
        cap is 0.5 there: a 10x or 2x rate (9, 1.0) still fails."""
        return min(100 * self.tolerance, 0.1 if self.tolerance < 1e-3 else 0.5)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_loss_abs_diff": self.max_loss_abs_diff,
            "max_grad_rel_diff": self.max_grad_rel_diff,
            "max_param_rel_diff": self.max_param_rel_diff,
            "max_buffer_rel_diff": self.max_buffer_rel_diff,
            "tolerance": self.tolerance,
            "param_tolerance": self.param_tolerance,
            "steps_compared": self.steps,
            "worst_param": self.worst_param,
            "worst_param_after_step": self.worst_param_after_step,
            "worst_buffer": self.worst_buffer,
            "buffers_compared": self.buffers,
        }


class ParityChecker:
    def __init__(self, model: nn.Module, cfg: RunConfig, state: DistState, make_optimizer) -> None:
        self.cfg, self.state = cfg, state
        self.ref = single_device_build(copy.deepcopy(model), cfg, state.device)
        self.opt = make_optimizer([p for _, p in self.ref.params])
        self.summary = CheckSummary(tolerance=cfg.resolved_tol)
        self._losses: list[torch.Tensor] = []
        self._before: dict[str, torch.Tensor] = {}
        # buffers updated per forward (a running average, a counter) see one update per piece too
        self.coupled = batch_coupled(model) or bool(held_buffers(model))

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, microbatches: int = 1) -> None:
        """One batch through the copy: whole, or, for a model with batch norm or buffers, in the
        pieces the style computes separately (each replica's shard, cut into its micro-batches),
        keeping the buffers replica 0's pieces left (replicas then take dp rank 0's)."""
        dev = self.state.device
        dp = self.state.layout.dp
        pieces = dp * microbatches if self.coupled else 1
        start = {n: b.detach().clone() for n, b in self.ref.buffers}
        replica0: dict[str, torch.Tensor] = {}
        for i, (xc, yc) in enumerate(zip(x.to(dev).chunk(pieces), y.to(dev).chunk(pieces))):
            if dp > 1 and self.coupled and i % microbatches == 0 and i > 0:
                self._set_buffers(start)  # every replica starts its shard from the same buffers
            self._losses.append(self.ref.step(xc, yc, 1.0 / pieces))
            if dp > 1 and self.coupled and i == microbatches - 1:
                replica0 = {n: b.detach().clone() for n, b in self.ref.buffers}
        self._set_buffers(replica0)

    @torch.no_grad()
    def _set_buffers(self, values: dict[str, torch.Tensor]) -> None:
        for n, b in self.ref.buffers:
            if n in values:
                b.copy_(values[n])

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
        worst, worst_name = worst_across(worst, worst_name)
        loss_diff = all_max(loss_diff, self.state)
        s = self.summary
        if worst > s.max_grad_rel_diff:
            s.worst_param = worst_name
        s.max_grad_rel_diff = max(s.max_grad_rel_diff, worst)
        s.max_loss_abs_diff = max(s.max_loss_abs_diff, loss_diff)
        s.steps += 1
        held = {name for name, _ in built.params}
        self._before = {n: p.detach().float().cpu().clone() for n, p in self.ref.params if n in held}
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sync_weights(self, built: Built) -> None:
        """After both optimizer steps: compare the updated parameters this rank holds, then take
        all of the style's new weights, every rank's (a collective: every rank calls it)."""
        # every parameter, also those other ranks hold: left to the copy's own updates they drift
        # from the style's by rounding, and after 30 steps that drift alone moved mnist-cnn's conv1
        # gradient on rank 0 by 1.4e-4 (pp 3, split 1,1,4, step 31 of the quick start)
        worst, worst_name = _compare_then_take(
            built.params, self.ref.params, lambda name, new, ref: update_rel_diff(new, ref, self._before[name])
        )
        if worst > self.summary.max_param_rel_diff:
            self.summary.max_param_rel_diff, self.summary.worst_param_after_step = worst, worst_name
        self._sync_buffers(built)

    @torch.no_grad()
    def _sync_buffers(self, built: Built) -> None:
        """Compare the buffers this rank holds with the copy's, then give the copy all of them."""
        if not self.ref.buffers:  # the whole model's: the same answer on every rank
            return
        self.summary.buffers = len(self.ref.buffers)
        worst, worst_name = _compare_then_take(
            built.buffers, self.ref.buffers, lambda name, held, ref: buffer_rel_diff(held, ref)
        )
        if worst > self.summary.max_buffer_rel_diff:
            self.summary.max_buffer_rel_diff, self.summary.worst_buffer = worst, worst_name


def _compare_then_take(held: list, ref: list, diff) -> tuple[float, str]:
    """The worst ``diff(name, style's, copy's)`` over the tensors this rank holds, across ranks;
    then the copy takes every rank's tensors (a collective: every rank calls it)."""
    ref_named = dict(ref)
    mine = {name: full_tensor(t).detach().cpu() for name, t in held}
    worst, worst_name = 0.0, ""
    for name, t in mine.items():
        d = diff(name, t, ref_named[name].detach().cpu())
        if d > worst:
            worst, worst_name = d, name
    for name, t in gather_named(mine).items():
        ref_named[name].copy_(t.to(ref_named[name].device))
    return worst_across(worst, worst_name)
