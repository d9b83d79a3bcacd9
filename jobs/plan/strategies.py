"""Strategy name -> build function. The only place that knows every style."""

from __future__ import annotations

from core.config import validate
from core.training.train import BuildFn
from jobs.plan.checks import check_model_and_layout


def get_build(strategy: str) -> BuildFn:
    # imported lazily: a reference or mp run never imports pipelining or DTensor
    if strategy in ("reference", "dp"):  # dp: the reference's whole model, one replica per device
        from core.check.reference import build_reference

        return build_reference
    if strategy == "mp":
        from mp import build

        return build
    if strategy == "pp":
        from pp import build

        return build
    if strategy == "tp":
        from tp import build

        return build
    raise ValueError(f"unknown strategy {strategy!r}")


def get_validator(strategy: str):
    """Strategy-specific checks that run on the submitting host (raise core.config.ConfigError)."""
    if strategy == "pp":
        from pp import validate

        return validate
    if strategy == "tp":
        from tp import validate

        return validate
    return lambda cfg, layout: None


def validate_run(cfg):
    """Every check that needs no host: the options, the model and its layout, then the style's own.
    Returns the layout (core.parallel.layout.Layout); raises core.config.ConfigError."""
    validate(cfg)
    layout = check_model_and_layout(cfg)
    get_validator(cfg.strategy)(cfg, layout)
    return layout
