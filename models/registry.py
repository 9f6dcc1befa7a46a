"""Name → builder registry, so that a checkpoint can rebuild the network it stores."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from torch import nn

from models.branchy import BranchyNet

Builder = Callable[..., BranchyNet]
_B = TypeVar("_B", bound=Builder)


class FamilyConfig(Protocol):
    """What every architecture config holds (see ``models/lenet.py``)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def branches(self) -> bool: ...


_C = TypeVar("_C", bound=FamilyConfig)

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


def register_family(
    config_cls: Callable[..., _C],
    parts: Callable[[_C], tuple[list[nn.Module], list[nn.Module]]],
    *,
    names: tuple[str, str],
    input_size: tuple[int, int],
    name_of: Callable[[_C], str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[Builder, Builder]:
    """Register a model family's branchy and plain builders, which differ only in the
    config's ``branches`` default.

    Args:
        config_cls: the family's config dataclass.
        parts: ``cfg -> (stages, heads)``, the architecture itself (one stage and one
            head when ``cfg.branches`` is false); its docstring describes both networks
            and becomes the builders'.
        input_size: ``(H, W)`` the network expects.
        name_of: the network's own name from its config (default: ``names[0]`` when
            ``cfg.branches``, else ``names[1]``).
        defaults: config values the builders fix unless given (e.g. a ResNet's depth).

    Returns:
        The branchy and the plain builder.
    """

    def name(cfg: _C) -> str:
        if name_of is not None:
            return name_of(cfg)
        return names[0] if cfg.branches else names[1]

    def make(registered: str, branches: bool) -> Builder:
        def builder(**config: object) -> BranchyNet:
            cfg = config_cls(**{**(defaults or {}), "branches": branches, **config})
            stages, heads = parts(cfg)
            return BranchyNet(
                stages,
                heads,
                name=name(cfg),
                config=cfg,
                input_shape=(cfg.in_channels, *input_size),
                num_classes=cfg.num_classes,
            )

        builder.__name__ = builder.__qualname__ = registered.replace("-", "_")
        builder.__doc__ = parts.__doc__
        return register_model(registered, config_cls)(builder)  # type: ignore[arg-type]

    return make(names[0], True), make(names[1], False)


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
