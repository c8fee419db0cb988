"""Which parameters of a model are sparsified, addressed by full dotted name.

The per-layer rules (Linear and subclasses, Hugging Face Conv1D, convolutions, RNN weight
matrices, the packed q/k/v of MultiheadAttention, Embedding on request, parametrized
weights) are in :mod:`rigl.layers`. Here they are applied to a whole model, one decision
per *tensor*: a parameter shared by several modules (tied weights, a module used twice) is
one target with one mask, counted once. Biases and norm parameters are never sparsified.

Over 300 lines: the scan, the tie detection, the include/exclude matching and the
per-target counts share the Target records and the name lookups built here.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

from rigl.config import ConfigError, SparsityConfig
from rigl.distributions import active_counts
from rigl.errors import warn
from rigl.layers import DEFAULT, EMBEDDING, Source, layer_weights, resolve
from rigl.patterns import UNSTRUCTURED, Pattern, fit_counts


@dataclass(frozen=True)
class Target:
    """One sparsified parameter: its full name, the module holding it (``module.param_name``)
    and the type of the layer that computes with it (``module_type``).

    ``name`` is the parameter's first name in ``model.named_parameters()``; ``aliases``
    are its other names (tied weights). ``blocks`` equal row blocks keep their own exact
    count (3 for a packed q/k/v projection). ``note`` says anything unusual about it.
    """

    name: str
    module: nn.Module
    param_name: str  # attribute name on the module, e.g. "weight" or "weight_hh_l0"
    module_type: str
    aliases: tuple[str, ...] = ()
    blocks: int = 1
    note: str = ""

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one block (the whole shape when ``blocks`` is 1)."""
        rows, *rest = self.shape
        return (rows // self.blocks, *rest)


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _matches(names: Iterable[str], modules: Iterable[nn.Module], patterns: tuple[str, ...]) -> bool:
    kinds = set().union(*(_type_names(m) for m in modules))
    return any(p in kinds or any(fnmatch.fnmatchcase(n, p) for n in names) for p in patterns)


@dataclass
class _Tensor:
    """Everything found about one candidate tensor while walking the model."""

    source: Source
    layer_names: list[str] = field(default_factory=list)  # e.g. "fc.weight" per use
    modules: list[nn.Module] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)
    blocks: int = 1


def _walk(model: nn.Module, config: SparsityConfig) -> dict[object, _Tensor]:
    """Every weight tensor a layer computes with, keyed by the tensor (so a shared one is
    found once, whichever module is visited first), in order of first visit."""
    found: dict[object, _Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for use in layer_weights(module, config.dense_grouped_convs):
            source = resolve(module, use.attr, module_name or type(module).__name__)
            if source is None:
                continue
            param = getattr(source.owner, source.attr)
            key = (id(source.owner), source.attr) if source.error else id(param)
            entry = found.setdefault(key, _Tensor(source, blocks=use.blocks))
            entry.layer_names.append(prefix + use.attr)
            entry.modules.append(module)
            entry.kinds.add(use.kind)
    return found


def scan_targets(model: nn.Module, config: SparsityConfig) -> tuple[list[Target], dict[str, str]]:
    """The targets, and {name: why} of the tied weights left dense by the embedding rule."""
    check_patterns(model, config)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    targets: list[Target] = []
    left_dense: dict[str, str] = {}
    for entry in _walk(model, config).values():
        source = entry.source
        param = getattr(source.owner, source.attr)
        all_names = [*names.get(id(param), []), *entry.layer_names]
        if config.exclude and _matches(all_names, entry.modules, config.exclude):
            continue
        included = bool(config.include) and _matches(all_names, entry.modules, config.include)
        if EMBEDDING in entry.kinds:  # a tied embedding/unembedding follows the embedding rule
            chosen = included or config.sparse_embeddings
            if not chosen and DEFAULT in entry.kinds:
                first, *others = names[id(param)]
                left_dense[first] = (
                    f"tied embedding/unembedding (also {', '.join(others)}): dense unless "
                    "sparse_embeddings=True"
                )
        else:
            chosen = included or DEFAULT in entry.kinds
        if not chosen:
            continue
        if source.error:
            raise ConfigError(source.error)
        if not param.requires_grad:
            continue  # frozen weights are never sparsified
        targets.append(_target(entry, names.get(id(param), entry.layer_names[:1])))
    if not targets:
        raise ConfigError(
            f"model {type(model).__name__} has nothing to sparsify: no Linear, Conv, RNN or "
            "attention weight was found (after include/exclude). Pass include=('TypeName',) "
            "for custom layers, or check the exclude patterns."
        )
    return targets, left_dense


def _target(entry: _Tensor, names: list[str]) -> Target:
    """The Target of one chosen tensor; ``names`` are its parameter names, first first."""
    # the layer type that computes with it: a tied head is a Linear, not an Embedding
    module = next((m for m in entry.modules if not isinstance(m, nn.Embedding)), entry.modules[0])
    notes = [entry.source.note] if entry.source.note else []
    if len(names) > 1:
        shared = len({id(m) for m in entry.modules}) == 1  # one module under several names
        notes.append(f"{'module used twice' if shared else 'tied'}: also {', '.join(names[1:])}")
    return Target(
        names[0],
        entry.source.owner,
        entry.source.attr,
        type(module).__name__,
        aliases=tuple(names[1:]),
        blocks=entry.blocks,
        note="; ".join(notes),
    )


def find_targets(model: nn.Module, config: SparsityConfig) -> list[Target]:
    """The parameters to sparsify, in module definition order (see :mod:`rigl.layers`).

    ``include`` adds module types (by class name) or parameter-name patterns whose
    weight is not sparsified by default; ``exclude`` removes matches (a shared tensor is
    matched by any of its names). Raises ``ConfigError`` if nothing is left to sparsify
    or a pattern matches nothing.
    """
    return scan_targets(model, config)[0]


def check_patterns(model: nn.Module, config: SparsityConfig) -> None:
    """Every include/exclude pattern must name a module type or a parameter of ``model``:
    a typo would otherwise be ignored silently."""
    if not (config.include or config.exclude):
        return
    kinds = set().union(*(_type_names(m) for m in model.modules()))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        names += [prefix + n for n in getattr(module, "parametrizations", {})]  # e.g. fc.weight
    for option in ("include", "exclude"):
        for pattern in getattr(config, option):
            if pattern in kinds or any(fnmatch.fnmatchcase(n, pattern) for n in names):
                continue
            shown = ", ".join(names[:40]) + (
                f", ... ({len(names) - 40} more)" if len(names) > 40 else ""
            )
            raise ConfigError(
                f"{option} pattern {pattern!r} matches no parameter name and no module type "
                f"of {type(model).__name__}; parameters: {shown}; module types: "
                f"{', '.join(sorted(k for k in kinds if k not in ('Module', 'object')))}"
            )


def custom_indices(targets: list[Target], config: SparsityConfig) -> dict[int, float]:
    """Target index -> fixed sparsity: custom entries plus first/last-layer-dense."""
    fixed: dict[int, float] = {}
    for pattern, value in config.custom_sparsity.items():
        hits = [
            i
            for i, t in enumerate(targets)
            if any(fnmatch.fnmatchcase(n, pattern) for n in (t.name, *t.aliases))
        ]
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


def target_counts(
    targets: list[Target], config: SparsityConfig, requested: list[int] | None = None
) -> list[int]:
    """Exact active-weight count of every target under ``config``: the distribution's
    counts (``requested``, :func:`requested_counts` when None) rounded to what the
    config's pattern holds."""
    if requested is None:
        requested = requested_counts(targets, config)
    return _fit_pattern(targets, requested, config.parsed_pattern)


def requested_counts(targets: list[Target], config: SparsityConfig) -> list[int]:
    """Active-weight count of every target as the distribution gives it, before a
    structured pattern rounds it: the budget the pattern matches as closely as it can
    (``summary_table()`` shows the deviation).

    A target of several blocks (a packed q/k/v projection) enters the distribution as
    that many layers of the block shape, as the three maps it computes would (ERK scores
    fan-in and fan-out per map); its count is their sum, kept split evenly over the blocks
    (see :func:`rigl.topology.split_evenly`).
    """
    fixed = custom_indices(targets, config)
    owner = [i for i, t in enumerate(targets) for _ in range(t.blocks)]
    counts = active_counts(
        [targets[i].block_shape for i in owner],
        config.sparsity,
        config.distribution,
        erk_power=config.erk_power,
        custom={j: fixed[i] for j, i in enumerate(owner) if i in fixed},
    )
    totals = [0] * len(targets)
    for i, n in zip(owner, counts, strict=True):
        totals[i] += n
    return totals


def view_2d(target: Target) -> tuple[int, int]:
    """``(rows, cols)``: the weight as selection sees it (``cols`` = inputs x kernel)."""
    rows = target.shape[0]
    return rows, math.prod(target.shape) // rows


def target_patterns(
    targets: list[Target], counts: list[int], config: SparsityConfig
) -> list[Pattern]:
    """The pattern of each target: the config's for a sparse one that can hold it, none for
    a dense one or one that cannot (see :func:`_fit_pattern`)."""
    pattern = config.parsed_pattern
    return [
        pattern
        if n < math.prod(t.shape) and not pattern.misfit(*view_2d(t), t.blocks)
        else UNSTRUCTURED
        for t, n in zip(targets, counts, strict=True)
    ]


def _fit_pattern(targets: list[Target], counts: list[int], pattern: Pattern) -> list[int]:
    """The counts rounded to what ``pattern`` holds (dense targets stay dense), their total
    as close to the unstructured budget as whole units allow (:func:`rigl.patterns.fit_counts`).
    A sparse target whose shape cannot hold the pattern keeps its count, unstructured, with
    a warning naming it."""
    if not pattern.structured:
        return counts
    sparse = []
    for i, t in enumerate(targets):
        if counts[i] == math.prod(t.shape):
            continue
        if why := pattern.misfit(*view_2d(t), t.blocks):
            warn(f"pattern {pattern}: {t.name} is left unstructured ({why})")
            continue
        sparse.append(i)
    shapes = [(*view_2d(targets[i]), targets[i].blocks) for i in sparse]
    fitted = fit_counts(
        pattern, [counts[i] for i in sparse], shapes, sum(counts[i] for i in sparse)
    )
    out = list(counts)
    for i, n in zip(sparse, fitted, strict=True):
        out[i] = n
    return out


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
