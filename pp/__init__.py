"""Pipeline parallelism: micro-batches flow through stages, one process per device."""

from pp.pipeline import build_pipeline, validate

build = build_pipeline

__all__ = ["build", "build_pipeline", "validate"]
