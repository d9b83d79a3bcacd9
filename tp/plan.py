"""Tensor (intra-layer) parallelism: the model's own plan, applied by DTensor.

A plan is data (a dict from module names to torch.distributed.tensor.parallel styles) and lives
with its model (``BlockModel.tp_plan``: gpt's Megatron split in core/models/gpt.py, the notebook's
column-then-row head in core/models/mnist_cnn.py, a user's in their own file). This module only
applies it, leaving out the blocks a pipeline stage does not hold, and refuses before anything
starts a model that has no plan or cannot run it at the asked degree: without a plan every rank
would silently hold and train the whole model.
"""

from __future__ import annotations

from torch.distributed.tensor.parallel import parallelize_module

from core.config import ConfigError, RunConfig
from core.models import BlockModel, describe
from core.parallel.layout import Layout


def tp_plan(model: BlockModel, cfg: RunConfig) -> dict:
    """The model's plan for the blocks this module holds (all of them, or a pipeline stage's)."""
    plan = model.tp_plan(cfg.sequence_parallel, cfg.loss_parallel) or {}
    held = set(model.blocks)
    return {k: v for k, v in plan.items() if not k.startswith("blocks.") or k.split(".")[1] in held}


def apply_tp(model: BlockModel, tp_mesh, cfg: RunConfig) -> BlockModel:
    """Shard the model's layers over ``tp_mesh`` in place, following its plan."""
    plan = tp_plan(model, cfg)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    return model


def validate(cfg: RunConfig, layout: Layout) -> None:
    """The model must have a plan, and its plan must run at this degree (the model says why not)."""
    model = describe(cfg.model, cfg.flavor)
    if model.tp_plan(cfg.sequence_parallel, cfg.loss_parallel) is None:
        raise ConfigError(
            f"--model {cfg.model} has no tensor-parallel plan, so every rank would train the whole model: "
            "use --strategy mp or pp, or give the model a tp_plan (README 'Your own model')"
        )
    why = model.tp_refusal(layout.tp, cfg.sequence_parallel, cfg.loss_parallel, cfg.strategy == "pp")
    if why:
        raise ConfigError(why)
