"""Validated configuration shared by every method, and the library's error type."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rigl._version import __version__


class ConfigError(ValueError):
    """A bad argument: the message names the argument, the value and what is allowed."""


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise ConfigError(
            f"{name}={value!r} is outside [0, 1): it is the fraction of weights that are zero "
            "(0.9 keeps 10% of the weights; use 0 for dense)"
        )
    return float(value)


def resolve_step(value: int | float | None, total_steps: int | None, name: str) -> int | None:
    """An absolute step (int) or a fraction of ``total_steps`` (float in (0, 1])."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name}={value!r} must be a step (int) or a fraction of total_steps")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"{name}={value!r}: a float is a fraction of total_steps and must be in [0, 1]; "
                "pass an int for an absolute step"
            )
        if total_steps is None:
            raise ConfigError(
                f"{name}={value!r} is a fraction of training, so total_steps is needed "
                "(pass total_steps=... or an absolute step as an int)"
            )
        return round(value * total_steps)
    if value < 0:
        raise ConfigError(f"{name}={value!r} must be >= 0")
    return int(value)


@dataclass(frozen=True)
class SparsityConfig:
    """Which weights are sparse and how densely: everything decided before training.

    Attributes:
        sparsity: global fraction of zeros S in [0, 1) over the sparsified layers.
        distribution: "uniform", "er" (Erdos-Renyi) or "erk" (Erdos-Renyi-Kernel).
        erk_power: exponent on the ERK score (1 = ERK, 0 = uniform).
        first_layer_dense / last_layer_dense: keep the first / last sparsified layer dense.
        custom_sparsity: {parameter name or fnmatch pattern: sparsity}; left out of the budget.
        include / exclude: module type names (e.g. "Conv2d") or parameter-name patterns.
        sparse_embeddings: also sparsify nn.Embedding weights.
        dense_grouped_convs: keep depthwise and grouped convolutions dense (the default).
    """

    sparsity: float = 0.9
    distribution: str = "erk"
    erk_power: float = 1.0
    first_layer_dense: bool = False
    last_layer_dense: bool = False
    custom_sparsity: Mapping[str, float] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    sparse_embeddings: bool = False
    dense_grouped_convs: bool = True

    def __post_init__(self) -> None:
        from rigl.distributions import DISTRIBUTIONS

        check_sparsity(self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"distribution={self.distribution!r} is unknown; allowed: {', '.join(DISTRIBUTIONS)}"
            )
        if isinstance(self.erk_power, bool) or not (
            isinstance(self.erk_power, int | float) and self.erk_power >= 0
        ):
            raise ConfigError(f"erk_power={self.erk_power!r} must be a number >= 0")
        for key, value in dict(self.custom_sparsity).items():
            check_sparsity(value, name=f"custom_sparsity[{key!r}]")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(v, str | type) for v in value):
                raise ConfigError(f"{name}={value!r} must be module type names or name patterns")
            object.__setattr__(
                self, name, tuple(v if isinstance(v, str) else v.__name__ for v in value)
            )
        object.__setattr__(self, "custom_sparsity", dict(self.custom_sparsity))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    def to_json(self) -> str:
        return json.dumps({"rigl_version": __version__, **self.to_dict()}, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsityConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"rigl_version"}
        if unknown:
            raise ConfigError(
                f"unknown sparsity config keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("include", "exclude"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> SparsityConfig:
        return cls.from_dict(json.loads(text))
