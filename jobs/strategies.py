"""Strategy name -> build function. The only place that knows every style."""

from __future__ import annotations

from core.train import BuildFn


def get_build(strategy: str) -> BuildFn:
    # imported lazily: a reference or mp run never imports pipelining or DTensor
    if strategy == "reference":
        from core.reference import build_reference

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
    return lambda cfg: None
