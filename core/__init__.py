"""Shared core of model-parallel-suite: data, models, the one training loop, reference and metrics."""
