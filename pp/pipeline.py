"""Pipeline parallelism on torch.distributed.pipelining: our stages, torch's schedules.

The model's blocks are cut at the same seams as mp (core.parallel.partition.stage_blocks); each rank holds
one stage, or two for interleaved / looped / V-shaped schedules, wrapped in ``PipelineStage``.
The schedule class comes from torch by name and owns forward and backward of every micro-batch.

Loss scaling, decided once: loss_fn returns the micro-batch MEAN divided by the number of
micro-batches and the schedule runs with ``scale_grads=False``. The summed micro-batch losses are
then the batch mean, and gradients equal one device's on the whole batch. (torch's default,
``scale_grads=True``, divides the accumulated .grad in place at every step, which silently
shrinks gradients accumulated over several batches: torchtitan #1733.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from core.config import ConfigError, RunConfig
from core.models import BlockModel, describe
from core.models.base import batch_coupled, held_buffers
from core.parallel.data_parallel import replicate_over_dp
from core.parallel.distributed import DistState
from core.parallel.layout import Layout
from core.parallel.partition import stage_blocks
from core.report.timeline import RecordedTimeline, TimelineRecorder
from core.training import progress
from core.training.strategy import Built, autocast
from pp.schedules import SCHEDULES, min_microbatches, stage_indices, theory_bubble
from pp.stage_timing import wrap_stage

# torch 2.14: ZBV's eval() fails ("can't steal_bwd_input if this stage doesn't have backward") and
# DualPipeV's cannot run forward-only either: these runs report no eval accuracy
NO_EVAL = {"zbv-zero-bubble", "dualpipev"}


def _sendable(t, stage: str):
    """What a stage hands on must be a tensor (or a tuple of them), contiguous (gloo and NCCL send
    contiguous buffers: a transpose's output fails with 'input tensor has to be contiguous') and
    not a view (split-backward schedules detach stage outputs in place, torch's
    stage_backward_input, which fails on a view such as Flatten's output): a copy where needed."""
    if isinstance(t, tuple):
        return tuple(_sendable(v, stage) for v in t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"stage ending with block {stage} returned {type(t).__name__}: blocks hand on tensors only")
    if not t.is_contiguous():
        return t.contiguous()
    return t.clone() if t._base is not None else t


def _sendable_output(stage: str):
    def hook(module, args, output):
        out = _sendable(output, stage)
        leaves, spec = tree_flatten(out)
        # torch's stages send one tensor or a flat tuple: a nested seam goes flat, the next stage
        # rebuilds it (_nested_input) from the structure seen on the meta device (seam_structures)
        return tuple(leaves) if isinstance(out, tuple) and len(leaves) != len(out) else out

    return hook


def seam_structures(cfg: RunConfig, x: torch.Tensor) -> dict[str, TreeSpec]:
    """The structure each block hands on (a tensor, a tuple, nested tuples), found by running the
    model on the meta device (no memory, no compute) on a micro-batch shaped like ``x``: what a
    receiving stage needs to rebuild a nested seam. Empty when the model cannot run on meta: seams
    are then taken as sent."""
    try:
        model = describe(cfg.model, cfg.flavor)
        out, specs = x.to("meta"), {}
        with torch.no_grad():
            for name, block in model.blocks.items():
                out = block(out)
                specs[name] = tree_flatten(out)[1]
        return specs
    except Exception:  # a model whose forward needs real values (data-dependent control flow)
        return {}


def _nested_input(specs: dict[str, TreeSpec], previous: str):
    """Rebuild the nested value block ``previous`` handed on from the flat tuple that arrived."""

    def hook(module, args):
        spec = specs.get(previous)
        if spec is None or not isinstance(args[0], tuple) or spec.num_leaves != len(args[0]):
            return None  # a tensor, or a model that could not run on meta: as sent
        return (tree_unflatten(list(args[0]), spec),)

    return hook


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward hands the gradient on contiguous. The gradient a stage sends
    back for its input takes the strides of however the first block used that input (a transpose
    gives a transposed gradient), and gloo refuses to send or receive non-contiguous buffers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_input_grads(module, args):
    def wrap(t):
        if isinstance(t, tuple):
            return tuple(wrap(v) for v in t)
        return _ContiguousGrad.apply(t) if isinstance(t, torch.Tensor) and t.requires_grad else t

    return wrap(args)


def _nbytes(t) -> int:
    # shape inference runs the stage once on meta tensors: those move nothing
    if isinstance(t, tuple):
        return sum(_nbytes(v) for v in t)
    real = isinstance(t, torch.Tensor) and t.device.type != "meta"
    return t.numel() * t.element_size() if real else 0


def schedule_rule(schedule: str, m: int, p: int, stages: int) -> str | None:
    """torch's own micro-batch rules, which its schedule classes raise only inside the job
    (torch.distributed.pipelining.schedules, 2.14): checked here, on the submitting host."""
    name = SCHEDULES[schedule].torch_name
    if name in ("1F1B", "DualPipeV") and m < stages:  # Schedule1F1B / ScheduleDualPipeV.__init__
        return f"--schedule {schedule} needs at least as many micro-batches as stages ({stages}; got {m})"
    if name in ("Interleaved1F1B", "InterleavedZeroBubble"):  # rounds of p micro-batches each
        rounds = max(1, m // p)
        if m % rounds:
            return f"--schedule {schedule} needs the micro-batches ({m}) to be a multiple of the rounds ({rounds})"
    return None


def _count_sends(sub, names: list[str], idx: int, n_stages: int, sent: dict) -> list:
    """Count what this stage hands to its neighbours: its output forward (unless it is the last
    stage) and the gradient of its input backward (unless it is the first), which has the input's
    size. Returns the hook handles: the caller removes them after the first step."""

    def on_input(module, args):
        if idx > 0:
            sent["backward"] += _nbytes(args)

    def on_output(module, args, output):
        if idx < n_stages - 1:
            sent["forward"] += _nbytes(output)

    return [
        sub.blocks[names[0]].register_forward_pre_hook(on_input),
        sub.blocks[names[-1]].register_forward_hook(on_output),
    ]


def _forwards_never_arm_ddp(module):
    """A DDP-wrapped stage whose forwards never arm DDP's reducer: the stage arms it itself before
    the last micro-batch's backward (torch's ``backward_maybe_with_nosync``) and runs every other
    forward and backward under ``no_sync``. torch 2.14's stage metadata inference, at the first
    step, runs one forward outside ``no_sync`` and takes gradients of the inputs only, which leaves
    the reducer armed; the first backward of the step then counts every parameter for DDP's bucket
    rebuild and the last counts them again, and when no forward comes between the two (GPipe, or
    1F1B's first stage with as many micro-batches as stages) the next step's forward fails inside
    torch ("rebuilt parameter indices size is not same as original model parameters size")."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = False  # what no_sync sets; no_sync restores this value
    return module


def default_microbatches(batch: int, schedule: str, p: int) -> int:
    """The smallest divisor of the batch that is at least 2p (a small bubble), else the largest allowed."""
    lo = min_microbatches(schedule, p)
    divisors = [d for d in range(lo, batch + 1) if batch % d == 0]
    if not divisors:
        return lo  # validate() reports it
    return next((d for d in divisors if d >= 2 * p), divisors[-1])


def resolved_microbatches(cfg: RunConfig, layout: Layout) -> int:
    """Micro-batches each replica cuts its shard of the global batch into."""
    b = layout.local_batch(cfg.resolved_batch_size)
    return cfg.microbatches or default_microbatches(b, cfg.schedule, layout.pp)


def validate(cfg: RunConfig, layout: Layout) -> None:
    """Everything the pipeline needs, checked on the submitting host (ConfigError: exit 2).
    Stage counts against blocks and --split are checked with the layout (jobs/plan/checks.py)."""
    if layout.processes == 1:  # torch's pipeline stages talk through a process group: none with one rank
        raise ConfigError(
            f"--strategy pp --gpus {cfg.gpus} is a pipeline of one stage, which is the whole model on one "
            "device: use --strategy reference --gpus 1, or --gpus 2 or more (without GPUs add --device cpu: "
            "each stage a CPU process)"
        )
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown --schedule {cfg.schedule!r}: choose one of {', '.join(SCHEDULES)}")
    p = layout.pp
    b = layout.local_batch(cfg.resolved_batch_size)
    per = f" (each of --dp {layout.dp} replicas takes {b} of --batch-size {cfg.resolved_batch_size})"
    per = per if layout.dp > 1 else ""
    if cfg.microbatches is not None and cfg.microbatches < 1:
        raise ConfigError(f"--microbatches must be at least 1 (got {cfg.microbatches})")
    m = resolved_microbatches(cfg, layout)
    if b % m:
        divs = [d for d in range(1, b + 1) if b % d == 0 and d >= min_microbatches(cfg.schedule, p)]
        raise ConfigError(
            f"--batch-size {cfg.resolved_batch_size} does not split into {m} equal micro-batches{per}: pick "
            f"--microbatches from {', '.join(map(str, divs[:8])) or 'none'} or change --batch-size"
        )
    need = min_microbatches(cfg.schedule, p)
    if m < need:
        raise ConfigError(
            f"--schedule {cfg.schedule} needs at least {need} micro-batches on {p} pipeline ranks "
            f"(got {m}): raise --microbatches"
        )
    why = schedule_rule(cfg.schedule, m, p, layout.stages)
    if why:
        raise ConfigError(f"{why}: change --microbatches")
    if b // m < 2 and batch_coupled(describe(cfg.model, cfg.flavor)):
        # batch norm normalises each micro-batch on its own: one sample has no variance to divide by
        raise ConfigError(
            f"--model {cfg.model} has batch norm, which needs at least 2 samples per micro-batch; "
            f"{m} micro-batches of {b} samples{per} leave {b // m}: lower --microbatches or raise --batch-size"
        )
    if layout.tp > 1:
        from tp import validate as tp_validate

        tp_validate(cfg, layout)


def build_pipeline(model: BlockModel, cfg: RunConfig, state: DistState) -> Built:
    layout = state.layout
    p, n_stages = layout.pp, layout.stages
    m = resolved_microbatches(cfg, layout)
    names = stage_blocks(model, n_stages, cfg.split)
    local = stage_indices(cfg.schedule, state.pp_rank, p)
    device = state.device
    pp_group = state.submesh("pp").get_group() if state.mesh is not None else None
    recorder = TimelineRecorder(state.rank, device)

    calls = {"n": 0}
    seams: dict[str, TreeSpec] = {}  # filled at the first step, when the input's shape is known
    modules, stages = [], []
    sent = {"forward": 0, "backward": 0}  # payload bytes this rank sends to its pipeline peers
    send_hooks: list = []
    for idx in local:
        sub = model.keep_only(names[idx], with_outside=idx == n_stages - 1)  # the loss's parameters: last stage
        if layout.tp > 1:
            from tp import apply_tp

            apply_tp(sub, state.submesh("tp"), cfg)
        sub.to(device)
        sub.blocks[names[idx][-1]].register_forward_hook(_sendable_output(names[idx][-1]))
        if idx > 0:
            first = sub.blocks[names[idx][0]]
            first.register_forward_pre_hook(_nested_input(seams, names[idx - 1][-1]))
            first.register_forward_pre_hook(_contiguous_input_grads)
        send_hooks += _count_sends(sub, names[idx], idx, n_stages, sent)
        # FSDP2 shards the stage in place; a DDP wrapper is what the stage runs (torch syncs either
        # once per step, after the last micro-batch's backward)
        stage = PipelineStage(
            _forwards_never_arm_ddp(replicate_over_dp(sub, state)), idx, n_stages, device, group=pp_group
        )
        wrap_stage(recorder, stage)
        progress.watch_stage(stage, pp_group)
        modules.append(sub)
        stages.append(stage)
    del model  # this rank keeps only its stages

    loss_module = modules[-1]
    loss_fn = lambda out, target: loss_module.loss(out, target) / m
    cls = get_schedule_class(SCHEDULES[cfg.schedule].torch_name)
    if issubclass(cls, PipelineScheduleSingle):
        schedule = cls(stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    else:
        schedule = cls(stages, n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    has_first, has_last = 0 in local, n_stages - 1 in local

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if calls["n"] == 0:
            seams.update(seam_structures(cfg, x[: max(1, len(x) // m)]))
        recorder.begin_step(calls["n"])
        losses: list[torch.Tensor] = []
        args = (x,) if has_first else ()
        kwargs = {"target": y, "losses": losses} if has_last else {}
        with autocast(cfg, device):
            schedule.step(*args, **kwargs)
        recorder.end_step()
        calls["n"] += 1
        if calls["n"] == 1:  # one step's sends counted: stop paying for the hooks
            for h in send_hooks:
                h.remove()
        loss = torch.stack([t.detach().float() for t in losses]).sum() if has_last else torch.zeros((), device=device)
        if pp_group is not None and p > 1:
            # every rank reports the real loss: only the last stage has it, the others add zero
            dist.all_reduce(loss, group=pp_group)
        return loss

    @torch.no_grad()
    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not hasattr(schedule, "eval") or cfg.schedule in NO_EVAL:
            return None  # older torch has no forward-only pipeline step
        args = (x,) if has_first else ()
        kwargs = {"target": y} if has_last else {}  # the last stage computes the loss in eval too
        with autocast(cfg, device):
            out = schedule.eval(*args, **kwargs)
        return out if has_last else None

    def train_mode(flag: bool) -> None:
        for sub in modules:
            sub.train(flag)

    timeline = RecordedTimeline(
        recorder, f"{cfg.schedule}: {p} ranks, {m} micro-batches, {cfg.model}", theory_bubble(cfg.schedule, p, m)
    )

    def result_extras() -> dict:
        return {
            "schedule": cfg.schedule,
            "microbatches": m,
            "pipeline_ranks": p,
            "tp": layout.tp,
            "stages_per_rank": layout.stages_per_rank,
            "stages": names,
            "stage_of_rank": {r: stage_indices(cfg.schedule, r, p) for r in range(p)},
            "p2p_bytes_per_step": {
                "rank": state.rank,
                "forward_send_bytes": sent["forward"],
                "backward_send_bytes": sent["backward"],
            },
            **timeline.figures(),
        }

    params = [(n, prm) for sub in modules for n, prm in sub.named_parameters()]
    # a stage owns its blocks' buffers; what lies outside the blocks belongs to the last stage
    buffers = [b for idx, sub in zip(local, modules) for b in held_buffers(sub, with_outside=idx == n_stages - 1)]
    return Built(
        params,
        step,
        predict,
        device,
        device,
        [device],
        train_mode,
        result_extras=result_extras,
        save_artifacts=lambda folder: timeline.save(folder, state.is_main),
        buffers=buffers,
        microbatches=m,
    )
