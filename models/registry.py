"""Name → builder registry, so that a checkpoint can rebuild the network it stores."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from models.branchy import BranchyNet

Builder = Callable[..., BranchyNet]
_B = TypeVar("_B", bound=Builder)

_REGISTRY: dict[str, tuple[Builder, type]] = {}


def register_model(name: str, config_cls: type) -> Callable[[_B], _B]:
    """Register ``builder(**config) -> BranchyNet`` under ``name``.

    Args:
        name: public model name, e.g. ``"b-lenet"``.
        config_cls: the config dataclass whose fields are the builder's keyword options.
    """

    def deco(fn: _B) -> _B:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (fn, config_cls)
        return fn

    return deco


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def config_fields(name: str) -> list[str]:
    """The keyword options of model ``name``."""
    _, cls = _lookup(name)
    return [f.name for f in dataclasses.fields(cls)]


def build_model(name: str, **config: Any) -> BranchyNet:
    """Build a freshly initialised network by name.

    Args:
        name: one of :func:`list_models`.
        **config: fields of the model's config dataclass (e.g. ``num_classes``).

    Raises:
        ValueError: unknown name or unknown config option.
    """
    fn, cls = _lookup(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; known: {sorted(known)}")
    return fn(**config)


def _lookup(name: str) -> tuple[Builder, type]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None
