"""Models and datasets by name, held as data: a name maps to an import path, never to an if-chain.

``--model`` is a built-in name (its import path below), ``torchvision:NAME`` (a torchvision
classification model cut into blocks, core.models.torchvision_blocks) or ``package.module:factory``
(a user's model: ``factory(flavor)`` returns a BlockModel). ``--dataset`` likewise: a built-in name
or ``package.module:factory``. Everything else the suite needs to know about a model it asks the
model itself (core.models.base.BlockModel's attributes), so nothing outside the model names it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import traceback
from collections.abc import Callable

import torch

from core.errors import ConfigError
from core.models.base import BlockModel
from core.models.randomness import switch_off_known

MODELS: dict[str, str] = {
    "mnist-cnn": "core.models.mnist_cnn:build",
    "gpt": "core.models.gpt:build",
    "delay": "core.models.delay:build",
}
PREFIXED_MODELS: dict[str, str] = {"torchvision": "core.models.torchvision_blocks:build"}
"""``PREFIX:NAME`` -> a factory called as ``factory(NAME, flavor)``."""
DATASETS: dict[str, str] = {
    "mnist": "core.data:mnist_for",
    "synthetic": "core.data:synthetic_for",
    "fakedata": "core.data:fakedata_for",
}
"""Dataset name -> ``factory(model, data_dir, seed, batch_size)`` returning core.data.Dataset."""


def where(e: BaseException, fallback: object = None) -> str:
    """``FILE:LINE`` of the user's code behind ``e``: a syntax error's own place, else the innermost
    frame outside this module (the line that raised, not our call of it), else ``fallback``'s file."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    here = os.path.abspath(__file__)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) != here]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    try:
        return inspect.getsourcefile(fallback) or repr(fallback)
    except TypeError:  # a builtin or a C callable has no source file
        return repr(fallback)


def one_line(e: BaseException) -> str:
    """``Type: message``, its first line only: a user's exception as one line of ours."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _import(path: str, flag: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not (module_name + ".").startswith(e.name + "."):
            # the module itself was found: something it imports is not installed
            raise ConfigError(f"{flag} {path}: importing {module_name} failed at {where(e)}: {one_line(e)}") from None
        raise ConfigError(
            f"{flag} {path}: cannot import {module_name} ({type(e).__name__}: {e}): "
            "put the folder that holds it on PYTHONPATH"
        ) from None
    except Exception as e:  # the module is there but fails as it loads: a syntax error, a raise at import
        raise ConfigError(f"{flag} {path}: importing {module_name} failed at {where(e)}: {one_line(e)}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{flag} {path}: {module_name} has no {attr!r}")
    return getattr(module, attr)


def is_import_path(name: str) -> bool:
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr.isidentifier() and all(p.isidentifier() for p in module.split(".")))


def model_factory(name: str) -> Callable[[str], BlockModel]:
    """The factory behind ``--model NAME``: ``factory(flavor) -> BlockModel``."""
    if name in MODELS:
        return _import(MODELS[name], "--model")
    prefix, _, rest = name.partition(":")
    if prefix in PREFIXED_MODELS and rest:
        return functools.partial(_import(PREFIXED_MODELS[prefix], "--model"), rest)
    if is_import_path(name):
        return _import(name, "--model")
    raise ConfigError(
        f"unknown --model {name!r}: choose one of {', '.join(MODELS)}, torchvision:NAME (e.g. torchvision:resnet18) "
        "or package.module:factory"
    )


def build_model(name: str, flavor: str = "tiny", dropout: bool = True) -> BlockModel:
    """Build on CPU; every rank that builds with the same seed gets the same weights."""
    factory = model_factory(name)
    flavors = getattr(factory, "flavors", None)  # a factory may declare its flavors
    if flavors is not None and flavor not in flavors:
        raise ConfigError(f"unknown --flavor {flavor!r} for {name}: choose one of {', '.join(flavors)}")
    try:
        model = factory(flavor)
    except ConfigError:
        raise
    except Exception as e:  # the user's factory: its own error, in one line naming its file
        raise ConfigError(f"--model {name}: the factory failed at {where(e, factory)}: {one_line(e)}") from None
    if not isinstance(model, BlockModel):
        raise ConfigError(f"--model {name}: the factory returned {type(model).__name__}, not a core.models.BlockModel")
    if len(model.blocks) == 0:
        raise ConfigError(f"--model {name}: the model has no blocks (put its layers in self.blocks, in order)")
    if not dropout:  # --check: the rest is found by behaviour in the job (core.models.randomness)
        switch_off_known(model)
    return model


@functools.lru_cache(maxsize=32)
def describe(name: str, flavor: str) -> BlockModel:
    """The model built on the meta device (shapes, no memory): what the submitting host checks."""
    with torch.device("meta"):
        return build_model(name, flavor)


def dataset_factory(name: str) -> Callable:
    if name in DATASETS:
        return _import(DATASETS[name], "--dataset")
    if is_import_path(name):
        return _import(name, "--dataset")
    raise ConfigError(f"unknown --dataset {name!r}: choose one of {', '.join(DATASETS)} or package.module:factory")
