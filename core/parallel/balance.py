"""The run's cut: which blocks each stage holds, chosen once, with the step time it predicts.

``--balance params`` cuts by parameter counts (a model is split to fit memory); ``--balance time``
(the default for mp and pp) measures every block's forward and backward on the target device
with one micro-batch of the run's shape (core.parallel.block_profile) and takes the contiguous split whose
slowest stage is fastest, within each device's memory. An explicit ``--split`` wins over both.
Both mp and pp (and interleaved chunks: stages = pp x stages per rank) take the same plan.

Where it is measured: on rank 0 only, then broadcast (one object, under the process group's
timeout). One measurement means every rank and every data-parallel replica cuts at the same
seams even when timings are noisy, and the other ranks' processes do not compete with it for
the host's cores while it measures (on CPU they would). The submitting host is not used: it may
have no GPU (a Slurm login node), and the target device is what must be measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from core.config import ConfigError, RunConfig
from core.models import describe
from core.models.base import BlockModel
from core.parallel.block_profile import BlockCost, profile_blocks
from core.parallel.distributed import DistState
from core.parallel.layout import Layout
from core.parallel.partition import balanced_split, time_split
from core.parallel.pipeline_schedules import SCHEDULES

# Usable share of a GPU's memory: the caching allocator fragments, CUDA and NCCL keep their own
MEMORY_HEADROOM = 0.9


@dataclass
class SplitPlan:
    balance: str
    """How the split was chosen: time, params, or split (given with --split)."""
    split: list[int]
    params_split: list[int]
    microbatches: int
    microbatch_samples: int
    device: str
    blocks: list[BlockCost] = field(default_factory=list)
    stage_of_rank: list[int] = field(default_factory=list)
    """The pipeline rank (mp: device) that holds each stage."""
    capacity_bytes: float | None = None

    # ---- predictions from the measured block costs -----------------------------------------
    def stage_time_s(self, split: list[int] | None = None) -> list[float]:
        """Forward + backward of one micro-batch on each stage."""
        out, start = [], 0
        for size in split or self.split:
            out.append(sum(b.time_s for b in self.blocks[start : start + size]))
            start += size
        return out

    def predicted(self, split: list[int] | None = None) -> dict:
        """Busy time per stage, step time and bubble the block costs predict for a split.

        Step = m x (busiest rank's work per micro-batch) + the fill: the other stages' work on the
        first micro-batch, which with v chunks per rank passes through each rank v times but each
        time on a 1/v chunk. Equal stages give the textbook (m+p-1)/m, and (p-1)/(vm+p-1) for v
        chunks; unequal ones are paced by the slowest rank. Communication is not in it.
        """
        t = self.stage_time_s(split)
        m, ranks = self.microbatches, max(self.stage_of_rank) + 1
        per_rank = [sum(t[s] for s, r in enumerate(self.stage_of_rank) if r == k) for k in range(ranks)]
        v = len(t) // ranks
        step = m * max(per_rank) + (sum(t) - max(per_rank)) / v
        bubble = 1.0 - m * sum(per_rank) / ranks / step if step > 0 else None
        return {"stage_busy_time_s": [m * x for x in t], "step_time_s": step, "bubble_fraction": bubble}

    def describe(self) -> str:
        ms = lambda xs: ", ".join(f"{1000 * x:.1f}" for x in xs)
        line = (
            f"balance {self.balance}: split {_fmt(self.split)}; predicted f+b per micro-batch of "
            f"{self.microbatch_samples} on {self.device} (ms): {ms(self.stage_time_s())}"
        )
        p = self.predicted()
        line += f"; predicted step {1000 * p['step_time_s']:.1f} ms, bubble {100 * p['bubble_fraction']:.1f}%"
        if self.params_split != self.split:
            q = self.predicted(self.params_split)
            line += f" (by params {_fmt(self.params_split)}: {1000 * q['step_time_s']:.1f} ms)"
        return line

    def report(self, measured: dict) -> dict:
        """result.json's ``balance``: the plan, its predictions, and what the timeline measured."""
        return {
            "balance": self.balance,
            "split": self.split,
            "params_split": self.params_split,
            "microbatch_samples": self.microbatch_samples,
            "profile_device": self.device,
            "blocks": [asdict(b) for b in self.blocks],
            "predicted": self.predicted(),
            "predicted_params_split": self.predicted(self.params_split),
            "measured": {
                "stage_busy_time_s": measured.get("stage_busy_time_s"),
                "step_time_s": measured.get("timeline_step_time_s"),
                "bubble_fraction": measured.get("bubble_fraction"),
            },
        }


def resolved_balance(cfg: RunConfig) -> str | None:
    """time unless --split or --balance says otherwise; None for styles that do not cut blocks."""
    if cfg.strategy not in ("mp", "pp"):
        return None
    if cfg.split is not None:
        return "split"
    return cfg.balance or "time"


def pipeline_microbatches(cfg: RunConfig, state: DistState) -> int:
    """Micro-batches per replica's batch, as pp.pipeline.resolved_microbatches counts them (core
    may not import pp: tests/test_balance.py checks the two agree); mp runs its batch as one."""
    return layout_microbatches(cfg, state.layout)


def layout_microbatches(cfg: RunConfig, layout: Layout) -> int:
    """``pipeline_microbatches`` from the layout alone: what a planner predicts before any rank exists."""
    if cfg.strategy != "pp":
        return 1
    if cfg.microbatches:
        return cfg.microbatches
    b, p = layout.local_batch(cfg.resolved_batch_size), layout.pp
    lo = p if SCHEDULES[cfg.schedule].min_microbatches == "p" else 1
    divisors = [d for d in range(lo, b + 1) if b % d == 0] or [lo]
    return next((d for d in divisors if d >= 2 * p), divisors[-1])  # the smallest >= 2p: a small bubble


def stage_owners(cfg: RunConfig, state: DistState) -> list[int]:
    """The pipeline rank (mp: device) holding each stage, from the schedule table's placement, as
    pp.schedules.stage_owner places them (checked against it in tests/test_balance.py)."""
    return layout_stage_owners(cfg, state.layout)


def layout_stage_owners(cfg: RunConfig, layout: Layout) -> list[int]:
    """``stage_owners`` from the layout alone."""
    n, p = layout.stages, layout.pp
    if cfg.strategy != "pp":
        return list(range(n))
    if SCHEDULES[cfg.schedule].placement == "v":  # r holds r and 2p-1-r
        return [s if s < p else 2 * p - 1 - s for s in range(n)]
    return [s % p for s in range(n)]  # a loop: r holds r, r+p, ...


def _capacity(device: torch.device, stages_per_rank: int) -> float | None:
    """Bytes one stage may use: the GPU's memory shared by the chunks its rank holds; CPU: no limit
    (host memory is shared by every rank of the host, so no per-device figure would mean anything)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory * MEMORY_HEADROOM / stages_per_rank


def stage_bytes_fn(cfg: RunConfig, layout: Layout, blocks: list[BlockCost], m: int):
    """Memory a stage needs: weights, gradients and optimizer state (AdamW: 2 more copies, SGD
    none; the model says, BlockModel.optimizer_state_copies), plus its activations times the
    micro-batches it holds at once: GPipe all m, 1F1B-like schedules the stages after it (the first
    stage holds p, the last 1). Under tp a block's share is 1/tp. An estimate: enough to refuse a
    split that cannot fit, not to promise one that does."""
    states = 2 + describe(cfg.model, cfg.flavor).optimizer_state_copies()  # weights, gradients, optimizer
    n, tp = layout.stages, layout.tp

    def stage_bytes(stage: int, i: int, j: int) -> float:
        if cfg.strategy == "mp":
            held = 1  # one micro-batch: the whole batch
        else:
            held = m if cfg.schedule == "gpipe" else min(m, n - stage)
        return sum(b.param_bytes * states + b.activation_bytes * held for b in blocks[i:j]) / tp

    return stage_bytes


def plan_for_run(model: BlockModel, cfg: RunConfig, state: DistState, train_x, train_y) -> SplitPlan | None:
    """The cut every rank uses (None for styles that do not cut blocks). A collective: every rank calls it."""
    balance = resolved_balance(cfg)
    if balance is None:
        return None
    m = pipeline_microbatches(cfg, state)
    rows = state.layout.local_batch(cfg.resolved_batch_size) // m
    n = state.layout.stages
    params_split = balanced_split(model.block_params(), n)
    plan: SplitPlan | str | None = None
    if state.rank == 0:
        blocks = profile_blocks(model, train_x[:rows], train_y[:rows], state.device, cfg)
        capacity = _capacity(state.device, state.layout.stages_per_rank)
        split = list(cfg.split) if balance == "split" else params_split
        try:
            if balance == "time":
                split = time_split(
                    [b.time_s for b in blocks], n, stage_bytes_fn(cfg, state.layout, blocks, m), capacity
                )
            plan = SplitPlan(
                balance, split, params_split, m, rows, str(state.device), blocks, stage_owners(cfg, state), capacity
            )
        except ValueError as e:  # no split fits: every rank must fail with the reason, not wait
            plan = f"{e}: use more --gpus, more --microbatches, or --dtype bf16"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [plan]
        # bounded by the process group's timeout (--dist-timeout), like every collective here
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        plan = box[0]
    if isinstance(plan, str):
        raise ConfigError(plan)
    return plan


def _fmt(split: list[int]) -> str:
    return ",".join(str(s) for s in split)
