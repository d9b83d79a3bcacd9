"""Tensor (intra-layer) parallelism: Megatron-style column/row splits on DTensor."""

from tp.build import build_tp
from tp.plan import apply_tp, tp_plan, validate

build = build_tp

__all__ = ["apply_tp", "build", "build_tp", "tp_plan", "validate"]
