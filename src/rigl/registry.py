"""The registry of sparse-training methods: names (and aliases) to method classes.

The built-in methods register themselves when :mod:`rigl.methods` is imported; methods
defined outside the package register with :func:`register_method` when their module is
imported. The environment variable ``RIGL_PLUGINS`` (module names, comma-separated) names
such modules so that the ``rigl`` command (and every worker process it starts, which
inherits the environment) imports them before it validates a method name.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rigl.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rigl.sparsifier import Sparsifier

__all__ = [
    "PLUGINS_ENV",
    "create",
    "dense_baseline",
    "find_method",
    "get_method",
    "is_dense",
    "list_aliases",
    "list_methods",
    "method_label",
    "register_method",
]

PLUGINS_ENV = "RIGL_PLUGINS"
_REGISTRY: dict[str, type[Sparsifier]] = {}
_ALIASES: dict[str, str] = {}  # alias -> registered name (e.g. "pruning" -> "gmp")
_loaded: set[str] = set()  # plugin modules imported so far


def register_method(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator adding a method to the registry under ``name`` (and the class's
    ``aliases``). A name already taken by another class is an error; the same class again
    (its module reloaded) replaces the entry."""

    def decorate(cls: type[Sparsifier]) -> type[Sparsifier]:
        aliases = cls.__dict__.get("aliases", ())  # its own: a subclass is another method
        for key in (name, *aliases):
            owner = _REGISTRY.get(_ALIASES.get(key, key))
            if owner is not None and _qualname(owner) != _qualname(cls):
                raise ConfigError(
                    f"method name {key!r} is already registered by {_qualname(owner)}; "
                    "choose another name for " + _qualname(cls)
                )
        cls.name = name
        _REGISTRY[name] = cls
        _ALIASES.update(dict.fromkeys(aliases, name))
        return cls

    return decorate


def _qualname(cls: type) -> str:
    # by name, not identity: a reloaded module defines a new class object of the same name
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_plugins() -> None:
    """Import the modules named by ``RIGL_PLUGINS`` (once each)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module in _loaded:
            continue
        _loaded.add(module)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            _loaded.discard(module)  # the next look-up says so again
            raise ConfigError(
                f"{PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r}: cannot import {module!r} ({exc}); "
                "name importable modules (on PYTHONPATH), comma-separated"
            ) from exc


def _registry() -> dict[str, type[Sparsifier]]:
    """The registry with the built-in methods (registered when ``rigl.methods`` is
    imported, which ``import rigl`` does not do eagerly) and the plugins in it."""
    import rigl.methods  # noqa: F401

    _load_plugins()
    return _REGISTRY


def list_methods() -> list[str]:
    """Names accepted by :func:`create` (aliases left out)."""
    return sorted(_registry())


def list_aliases() -> list[str]:
    """Other names of registered methods (e.g. "pruning" for "gmp")."""
    _registry()
    return sorted(_ALIASES)


def find_method(name: str) -> type[Sparsifier] | None:
    """The class registered under ``name`` or one of its aliases (case and ``-``/``_``
    insensitive), or None."""
    if not isinstance(name, str):
        return None
    key = name.lower().replace("-", "_")
    registry = _registry()
    return registry.get(_ALIASES.get(key, key))


def method_label(name: str) -> str:
    """The row name of ``name`` in result tables ("RigL", "Pruning"); unknown names (a run
    folder of a plugin not loaded) as they are."""
    cls = find_method(name)
    return (cls.label or cls.name) if cls is not None else name


def is_dense(name: str) -> bool:
    """Whether ``name`` is the dense baseline (a method whose ``sparse`` is False)."""
    cls = find_method(name)
    return cls is not None and not cls.sparse


def dense_baseline() -> str:
    """The name of the dense baseline that sweeps add to every comparison."""
    return next(name for name in list_methods() if is_dense(name))


def get_method(name: str) -> type[Sparsifier]:
    cls = find_method(name)
    if cls is None:
        raise ConfigError(f"method={name!r} is unknown; allowed: {', '.join(list_methods())}")
    return cls


def create(
    method: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, **kwargs: Any
) -> Sparsifier:
    """Build the sparsifier of ``method`` (see :func:`list_methods`) for ``model``."""
    return get_method(method)(model, optimizer, **kwargs)
