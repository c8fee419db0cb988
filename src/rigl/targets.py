"""Which parameters of a model are sparsified, addressed by full dotted name.

By default: the weights of Linear and Conv1d/2d/3d (depthwise and grouped convs stay
dense), the weight matrices of RNN/GRU/LSTM (``weight_ih_l*``, ``weight_hh_l*``) and the
input projection of MultiheadAttention; Embedding on request. Biases and norm
parameters are never sparsified.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from rigl.config import ConfigError, SparsityConfig
from rigl.distributions import active_counts


@dataclass(frozen=True)
class Target:
    """One sparsified parameter: its full name, owning module and the module's type."""

    name: str
    module: nn.Module
    param_name: str  # attribute name on the module, e.g. "weight" or "weight_hh_l0"
    module_type: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RNNS = (nn.RNN, nn.GRU, nn.LSTM)


def _default_params(module: nn.Module, config: SparsityConfig) -> list[str]:
    """Parameter attributes of ``module`` that are sparsified by default."""
    if isinstance(module, nn.Linear):
        return ["weight"]
    if isinstance(module, _CONVS):
        if module.groups > 1 and config.dense_grouped_convs:
            return []
        return ["weight"]
    if isinstance(module, _RNNS):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    if isinstance(module, nn.MultiheadAttention):
        return [
            n
            for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
            if getattr(module, n, None) is not None
        ]
    if isinstance(module, nn.Embedding) and config.sparse_embeddings:
        return ["weight"]
    return []


def _matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> bool:
    kinds = {cls.__name__ for cls in type(module).__mro__}
    return any(p in kinds or fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(model: nn.Module, config: SparsityConfig) -> list[Target]:
    """The parameters to sparsify, in module definition order.

    ``include`` adds module types (by class name) or parameter-name patterns whose
    ``weight`` is not sparsified by default; ``exclude`` removes matches. Raises
    ``ConfigError`` if nothing is left to sparsify.
    """
    targets: list[Target] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = _default_params(module, config)
        if not names and config.include:
            weight = getattr(module, "weight", None)
            if (
                isinstance(weight, nn.Parameter)
                and weight.dim() >= 2
                and _matches(prefix + "weight", module, config.include)
            ):
                names = ["weight"]
        for param_name in names:
            full = prefix + param_name
            param = getattr(module, param_name)
            if id(param) in seen or not param.requires_grad:
                continue  # tied weights are sparsified once; frozen ones never
            if config.exclude and _matches(full, module, config.exclude):
                continue
            seen.add(id(param))
            targets.append(Target(full, module, param_name, type(module).__name__))
    if not targets:
        raise ConfigError(
            f"model {type(model).__name__} has nothing to sparsify: no Linear, Conv, RNN or "
            "attention weight was found (after include/exclude). Pass include=('TypeName',) "
            "for custom layers, or check the exclude patterns."
        )
    return targets


def custom_indices(targets: list[Target], config: SparsityConfig) -> dict[int, float]:
    """Layer index -> fixed sparsity: custom entries plus first/last-layer-dense."""
    fixed: dict[int, float] = {}
    for pattern, value in config.custom_sparsity.items():
        hits = [i for i, t in enumerate(targets) if fnmatch.fnmatchcase(t.name, pattern)]
        if not hits:
            raise ConfigError(
                f"custom_sparsity names {pattern!r}, which matches no sparsified parameter; "
                f"valid names: {', '.join(t.name for t in targets)}"
            )
        fixed.update(dict.fromkeys(hits, value))
    if config.first_layer_dense:
        fixed[0] = 0.0
    if config.last_layer_dense:
        fixed[len(targets) - 1] = 0.0
    return fixed


def target_counts(targets: list[Target], config: SparsityConfig) -> list[int]:
    """Exact active-weight count of every target under ``config``."""
    return active_counts(
        [t.shape for t in targets],
        config.sparsity,
        config.distribution,
        erk_power=config.erk_power,
        custom=custom_indices(targets, config),
    )


def layer_densities(
    model: nn.Module, sparsity: float, distribution: str = "erk", **options: object
) -> dict[str, float]:
    """{full parameter name: density} for ``model``, computed without training.

    ``options`` are the other fields of :class:`rigl.SparsityConfig`
    (``first_layer_dense``, ``last_layer_dense``, ``erk_power``, ``custom_sparsity``,
    ``include``, ``exclude``, ``sparse_embeddings``, ``dense_grouped_convs``).
    Densities are exact: ``n_active / numel`` with integer ``n_active``.
    """
    config = make_config(sparsity=sparsity, distribution=distribution, **options)
    targets = find_targets(model, config)
    counts = target_counts(targets, config)
    return {t.name: n / math.prod(t.shape) for t, n in zip(targets, counts, strict=True)}


def make_config(**options: object) -> SparsityConfig:
    """Build a SparsityConfig, turning an unknown keyword into a ConfigError naming it."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(SparsityConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; allowed: {sorted(known)}")
    return SparsityConfig(**options)  # type: ignore[arg-type]


def check_model_names(targets: list[Target], names: Mapping[str, object]) -> None:
    """Raise if ``names`` (e.g. from a state dict) do not match the targets."""
    expected = [t.name for t in targets]
    if list(names) != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        raise ConfigError(
            "state dict does not belong to this model: "
            f"missing masks {missing or 'none'}, unexpected masks {extra or 'none'}"
        )
