"""Switch off every source of randomness a model holds, for ``--check``.

Random layers draw their masks per call, so a model cut into micro-batches or shards draws other
masks than one device on the whole batch: the parity check compares with all of them off.
Two passes: by class (cheap, works on the meta device: torch's Dropout family, torchvision's
StochasticDepth), then by behaviour, on a real sample: a module whose training-mode output
differs between two calls on the same input draws random numbers. A module found that way is
switched off through its rate attribute (``p``, ``drop_prob``, ``drop_rate``, ...) where it has
one; one that has none is refused in one line naming it.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from core.errors import ConfigError

RATE_ATTRIBUTES = ("p", "drop_prob", "drop_rate", "drop_path_prob", "stochastic_depth_prob")
"""Attributes that hold a random layer's rate in torch, torchvision and common user code."""


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "dropout"
    if type(module).__name__ == "StochasticDepth":  # torchvision.ops: efficientnet, convnext, swin, maxvit
        return "stochastic depth"
    return ""


def _rate_attribute(module: nn.Module) -> str | None:
    for attr in RATE_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            return attr
    return None


def switch_off_known(model: nn.Module) -> Counter:
    """Rate 0 for every layer known to be random by its class; returns how many of each kind."""
    off: Counter = Counter()
    for m in model.modules():
        kind = _kind(m)
        if kind:
            m.p = 0.0
            off[kind] += 1
    return off


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def _tree_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    return a == b


def _call_twice(module: nn.Module, args: tuple) -> bool:
    """Whether two calls on the same input, from the same buffers, agree (the random state moves
    on between them). Buffers are put back after each call: a layer whose output follows its own
    running statistics (batch norm, a running mean) is stateful, not random."""
    saved = {k: v.detach().clone() for k, v in module.named_buffers()}

    def call():
        out = module(*args)
        named = dict(module.named_buffers())
        for k, v in saved.items():
            named[k].copy_(v)
        return out

    return _tree_equal(call(), call())


@torch.no_grad()
def _random_modules(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The innermost modules whose training-mode output differs between two calls on the same input."""
    inputs: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args)  # the first call's input (a shared module runs more than once)

        return hook

    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in model.named_modules()]
    try:
        first = _call_twice(model, (sample,))
    finally:
        for h in hooks:
            h.remove()
    if first:
        return []
    found: list[tuple[str, nn.Module]] = []
    # innermost first: a module is named only when none of its children explains its randomness
    called = sorted(((n, m) for n, m in model.named_modules() if n in inputs), key=lambda nm: -_depth(nm[0]))
    for name, m in called:
        if any(not name or f.startswith(name + ".") for f, _ in found):
            continue
        try:
            if not _call_twice(m, inputs[name]):
                found.append((name, m))
        except Exception:  # cannot be called alone (keyword arguments, state): its parent is judged
            continue
    return found


def switch_off_randomness(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Every random layer off (``switch_off_known``, then by behaviour on ``sample``): returns what
    was switched off, in words, for the check line. ConfigError (one line) for a layer that draws
    random numbers and has no rate to set to zero. Leaves the random state and buffers as they were."""
    off = switch_off_known(model)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    mode = model.training
    model.train(True)
    try:
        with torch.random.fork_rng(devices=[]):
            for name, m in _random_modules(model, sample):
                attr = _rate_attribute(m)
                label = name or "the model itself"
                if attr is None:
                    raise ConfigError(
                        f"--check: {label} ({type(m).__name__}) draws random numbers in training mode and has no "
                        f"rate attribute ({', '.join(RATE_ATTRIBUTES)}) to set to 0: give it one or run without --check"
                    )
                setattr(m, attr, 0.0)
                off[f"{type(m).__name__}.{attr}"] += 1
            left = _random_modules(model, sample)
            if left:
                name, m = left[0]
                raise ConfigError(
                    f"--check: {name or 'the model'} ({type(m).__name__}) still draws random numbers with its "
                    "rate at 0: make it deterministic when its rate is 0, or run without --check"
                )
    finally:
        model.train(mode)
        named = dict(model.named_buffers())
        for k, v in buffers.items():
            named[k].copy_(v)
    return [f"{kind} ({n})" for kind, n in off.items()]
