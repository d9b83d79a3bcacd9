"""Counting the collectives tensor parallel issues: torch's CommDebugMode, plus payload bytes.

CommDebugMode counts every DTensor collective per op and per module, forward and backward apart.
We add the payload: the bytes of the tensor each rank hands to the collective (not wire bytes,
which depend on the algorithm: a ring all-reduce sends about twice that).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.tensor.debug import CommDebugMode


def _short(op) -> str:
    return str(op).split(".")[-1].replace("_into_tensor", "").replace("_tensor", "")


class CommCounter(CommDebugMode):
    def __init__(self) -> None:
        super().__init__()
        self.payload_bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = sum(self.comm_counts.values())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if sum(self.comm_counts.values()) > before:
            t = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if t is not None:
                self.payload_bytes[_short(func._overloadpacket)] += t.numel() * t.element_size()
        return out

    def summary(self, layer_suffix: str | None = None) -> dict:
        """Counts per op for the whole step, and forward/backward counts for one layer."""
        out = {
            "counts": {_short(k): v for k, v in self.get_comm_counts().items()},
            "payload_bytes": dict(self.payload_bytes),
        }
        if layer_suffix:
            for name, per in self.comm_module_counts.items():
                if name.endswith(layer_suffix):
                    out["per_layer"] = {
                        "module": layer_suffix,
                        "forward": {_short(k): v for k, v in per["forward"].items()},
                        "backward": {_short(k): v for k, v in per["backward"].items()},
                    }
                    break
        return out
