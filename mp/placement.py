"""Vanilla model parallelism: cut the blocks into N consecutive stages on N devices, in ONE process.

The forward moves activations across a seam when the next block lives elsewhere (a forward
pre-hook on the first block of each stage); autograd carries gradients back the same way. Only
one device works at a time: that idle time is what pipelining (pp/) removes.

The notebook launched this kind of program with ``torchrun --nproc-per-node=3`` and so trained
three independent copies; here it is one process driving all devices.
"""

from __future__ import annotations

import torch
from torch import nn

from core.config import RunConfig
from core.models import BlockModel
from core.models.base import held_buffers
from core.parallel.data_parallel import replicate_over_dp
from core.parallel.distributed import DistState
from core.parallel.partition import stage_blocks
from core.report.timeline import RecordedTimeline, TimelineRecorder
from core.training.strategy import Built, autocast


def stage_devices(n: int, first: torch.device) -> list[torch.device]:
    """n consecutive GPUs from ``first`` (wrapping round when asked for more stages than GPUs, e.g.
    all on cuda:0 to measure placement overhead), or n CPU 'devices' (all the host CPU) without GPU."""
    if first.type == "cuda":
        return [torch.device("cuda", (first.index + i) % torch.cuda.device_count()) for i in range(n)]
    return [torch.device("cpu")] * n


def _to_device(device: torch.device):
    def move(a):  # a block may hand its successor a tuple of tensors (the seam contract)
        if isinstance(a, torch.Tensor):
            return a.to(device, non_blocking=True)
        return type(a)(move(v) for v in a) if isinstance(a, (tuple, list)) else a

    def hook(module: nn.Module, args: tuple) -> tuple:
        return move(args)

    return hook


def place_layers(model: BlockModel, devices: list[torch.device], split: list[int] | None = None) -> list[list[str]]:
    """Move each stage's blocks to its device and route activations across the seams.

    Returns the block names of each stage. The model class is untouched: placement is hooks.
    """
    stages = stage_blocks(model, len(devices), split)
    blocks, model.blocks = model.blocks, nn.ModuleDict()
    model.to(devices[-1])  # what lies outside the blocks serves the loss, on the last device
    model.blocks = blocks
    for i, (names, device) in enumerate(zip(stages, devices)):
        for name in names:
            model.blocks[name].to(device)
        if i == 0 or device != devices[i - 1]:  # a seam that crosses devices (no hook where none is crossed)
            model.blocks[names[0]].register_forward_pre_hook(_to_device(device))
    return stages


def time_stages(model: BlockModel, stages: list[list[str]], recorder: TimelineRecorder) -> tuple[dict, list]:
    """Hooks that time each stage's forward and backward (one row per stage in the timeline).

    Returns the open-action table and the hook handles: remove them once the recorded steps are
    over (full backward hooks add autograd nodes to every step: 40% slower mnist-cnn steps on an
    H200, measured). Stage 0's backward ends when loss.backward() returns (its input, the images,
    has no gradient for a module hook to fire on), so the caller closes it.
    """
    open_: dict = {}
    handles = []
    for i, names in enumerate(stages):
        first_block, last_block = model.blocks[names[0]], model.blocks[names[-1]]
        handles += [
            first_block.register_forward_pre_hook(lambda m, a, i=i: open_.__setitem__(("F", i), recorder.start())),
            last_block.register_forward_hook(
                lambda m, a, o, i=i: recorder.record(i, "F", 0, open_.pop(("F", i)), row=i)
            ),
            last_block.register_full_backward_pre_hook(lambda m, g, i=i: open_.__setitem__(("B", i), recorder.start())),
        ]
        if i > 0:
            handles.append(
                first_block.register_full_backward_hook(
                    lambda m, gi, go, i=i: recorder.record(i, "B", 0, open_.pop(("B", i)), row=i)
                )
            )
    return open_, handles


def build(model: BlockModel, cfg: RunConfig, state: DistState) -> Built:
    n = state.layout.stages
    devices = stage_devices(n, state.device)
    stages = place_layers(model, devices, cfg.split)
    run = replicate_over_dp(model, state)  # DDP over a replica spanning several devices
    first, last = devices[0], devices[-1]
    unique = list(dict.fromkeys(devices))
    recorder = TimelineRecorder(0, first, sync_devices=unique if first.type == "cuda" else None)
    open_actions, hooks = time_stages(model, stages, recorder)
    timeline = RecordedTimeline(recorder, f"mp: {n} stages, {cfg.model}", (n - 1) / n)
    calls = {"n": 0}
    replica = f" (replica {state.dp_rank})" if state.layout.dp > 1 else ""
    print(f"mp stages{replica}: " + " | ".join(f"{d}: {','.join(b)}" for b, d in zip(stages, devices)), flush=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        recorder.begin_step(calls["n"])
        with autocast(cfg, first):
            out = run(x)
        loss = model.loss(out, y.to(out.device))
        loss.backward()
        recorder.record(0, "B", 0, open_actions.pop(("B", 0), None), row=0)
        recorder.end_step()
        calls["n"] += 1
        if calls["n"] == recorder.max_steps:  # timeline recorded: stop paying for the hooks
            for h in hooks:
                h.remove()
        return loss.detach()

    @torch.no_grad()
    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        recorder.begin_step(-1)  # not recorded
        with autocast(cfg, first):
            return model(x)

    return Built(
        list(model.named_parameters()),
        step,
        predict,
        first,
        last,
        unique,
        model.train,
        result_extras=lambda: {"stages": stages, **timeline.figures()},
        buffers=held_buffers(model),
        save_artifacts=lambda folder: timeline.save(folder, True),
    )
