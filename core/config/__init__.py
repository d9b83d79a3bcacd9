"""The run's description: every option declared once, as data, with its plain checks."""

from core.config.options import (
    BALANCES,
    CLUSTERS,
    DEVICES,
    DP_MODES,
    DTYPES,
    STRATEGIES,
    ConfigError,
    RunConfig,
    existing_parent,
    flag_of,
    option,
    validate,
)

__all__ = [
    "BALANCES",
    "CLUSTERS",
    "DEVICES",
    "DP_MODES",
    "DTYPES",
    "STRATEGIES",
    "ConfigError",
    "RunConfig",
    "existing_parent",
    "flag_of",
    "option",
    "validate",
]
