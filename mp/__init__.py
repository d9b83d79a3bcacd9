"""Vanilla model parallelism: consecutive blocks on different devices, one process."""

from mp.placement import build, place_layers, stage_devices

__all__ = ["build", "place_layers", "stage_devices"]
