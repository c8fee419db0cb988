"""Validated configuration shared by every method (the error type lives in rigl.errors)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rigl._version import __version__
from rigl.errors import ConfigError, check_int, check_real, is_int, is_real

if TYPE_CHECKING:  # rigl.patterns imports torch, which `rigl --help` must not load
    from rigl.patterns import Pattern


def check_sparsity(value: Any, name: str = "sparsity") -> float:
    return check_real(
        value,
        name,
        low=0.0,
        high=1.0,
        high_open=True,
        hint=": it is the fraction of weights that are zero (0.9 keeps 10% of the weights; "
        "use 0 for dense)",
    )


def resolve_step(value: Any, total_steps: int | None, name: str) -> int | None:
    """An absolute step (an int >= 0) or a fraction of ``total_steps`` (a float in [0, 1])."""
    if value is None:
        return None
    if is_int(value):
        return check_int(value, name, low=0)
    if not is_real(value):
        raise ConfigError(f"{name}={value!r} must be a step (int) or a fraction of total_steps")
    fraction = check_real(
        value,
        name,
        low=0.0,
        high=1.0,
        hint=": a float is a fraction of total_steps; pass an int for an absolute step",
    )
    if total_steps is None:
        raise ConfigError(
            f"{name}={value!r} is a fraction of training, so total_steps is needed "
            "(pass total_steps=... or an absolute step as an int)"
        )
    return round(fraction * total_steps)


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
        pattern: the structure of every sparse layer's mask (:mod:`rigl.patterns`):
            "unstructured", "fanin", "N:M" (e.g. "2:4") or "block:RxC". Under N:M every
            sparse layer has density N/M, so ``sparsity`` must be ``1 - N/M`` (or 0).
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
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        from rigl.distributions import DISTRIBUTIONS

        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"distribution={self.distribution!r} is unknown; allowed: {', '.join(DISTRIBUTIONS)}"
            )
        object.__setattr__(self, "erk_power", check_real(self.erk_power, "erk_power", low=0.0))
        custom = {
            key: check_sparsity(value, name=f"custom_sparsity[{key!r}]")
            for key, value in dict(self.custom_sparsity).items()
        }
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(v, str | type) for v in value):
                raise ConfigError(f"{name}={value!r} must be module type names or name patterns")
            object.__setattr__(
                self, name, tuple(v if isinstance(v, str) else v.__name__ for v in value)
            )
        object.__setattr__(self, "custom_sparsity", custom)
        from rigl.patterns import parse_pattern  # imports torch: only when a config is built

        object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))
        _check_nm_sparsity(self)

    @property
    def parsed_pattern(self) -> Pattern:
        from rigl.patterns import parse_pattern

        return parse_pattern(self.pattern)

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


def _check_nm_sparsity(config: SparsityConfig) -> None:
    """N:M holds exactly N of every M weights: the only sparsity it has is ``1 - N/M``."""
    pattern = config.parsed_pattern
    if pattern.kind != "nm":
        return
    fixed = 1.0 - pattern.n / pattern.m
    asked = {"sparsity": config.sparsity}
    asked.update({f"custom_sparsity[{k!r}]": v for k, v in config.custom_sparsity.items()})
    for name, value in asked.items():
        if value != 0.0 and abs(value - fixed) > 1e-9:
            raise ConfigError(
                f"{name}={value} does not fit pattern {pattern}: it keeps {pattern.n} of every "
                f"{pattern.m} weights, sparsity {fixed:g} in every sparse layer; pass "
                f"{name}={fixed:g} (or 0 for a dense layer), or choose another N:M"
            )
