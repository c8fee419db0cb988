"""What a sparsifier reports about its layers, and the on-demand invariant check.

``summary()`` puts the measured density (non-zero entries now) beside the target one, so a
weight that went dense behind the sparsifier's back shows; it names the backend of every
layer and why (``backend="sparse"`` keeps some layers masked), ties and parametrizations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rigl.guard import InvariantError

if TYPE_CHECKING:
    from rigl.sparsifier import Sparsifier


@dataclass(frozen=True)
class LayerSummary:
    """One sparsified tensor: target density ``n_active / n_total`` and what is measured."""

    name: str
    shape: tuple[int, ...]
    density: float
    n_active: int
    n_total: int
    measured_density: float = float("nan")  # non-zero entries / n_total, counted now
    backend: str = "masked"  # "masked" (dense weight and mask) or "sparse" (SparseLinear)
    note: str = ""  # why this backend; tied names; q/k/v blocks; parametrization


def summarize(sparsifier: Sparsifier) -> list[LayerSummary]:
    rows = []
    for weight, target, (backend, why) in zip(
        sparsifier.weights, sparsifier.targets, sparsifier.layer_backends, strict=True
    ):
        notes = [n for n in (why, target.note) if n]
        if weight.blocks > 1:
            notes.append(f"{weight.blocks} row blocks (q, k, v) keep their own counts")
        rows.append(
            LayerSummary(
                weight.name,
                weight.shape,
                weight.density,
                weight.n_active,
                weight.numel,
                weight.n_nonzero / weight.numel,
                backend,
                "; ".join(notes),
            )
        )
    return rows


def format_table(rows: list[LayerSummary], left_dense: dict[str, str]) -> str:
    """Aligned columns whatever the name lengths; tied weights left dense listed below."""
    width = max([5, *(len(r.name) for r in rows)])
    head = f"{'layer':<{width}} {'shape':<14} {'density':>8} {'measured':>8} {'active':>11} {'total':>11}  backend"
    lines = [head]
    for r in rows:
        shape = "x".join(map(str, r.shape))
        note = f"  ({r.note})" if r.note else ""
        lines.append(
            f"{r.name:<{width}} {shape:<14} {r.density:>8.4f} {r.measured_density:>8.4f} "
            f"{r.n_active:>11,} {r.n_total:>11,}  {r.backend}{note}"
        )
    active, total = sum(r.n_active for r in rows), sum(r.n_total for r in rows)
    nonzero = sum(r.measured_density * r.n_total for r in rows)
    lines.append(
        f"{'total':<{width}} {'':<14} {active / total:>8.4f} {nonzero / total:>8.4f} "
        f"{active:>11,} {total:>11,}"
    )
    lines += [f"dense: {name} ({why})" for name, why in left_dense.items()]
    return "\n".join(lines)


def check(sparsifier: Sparsifier) -> None:
    """Raise :class:`InvariantError` naming every layer whose invariants are broken: active
    count against the target, the mask or index against the count, zeros at inactive
    positions, optimizer state there (see the storages' ``violations``)."""
    broken = []
    for weight, target in zip(sparsifier.weights, sparsifier.target_counts, strict=True):
        found = weight.violations(sparsifier.optimizer)
        n = weight.n_active
        if sparsifier.dense_start and not target <= n <= weight.numel:
            found.append(f"{n} active weights, outside [{target}, {weight.numel}]")
        elif not sparsifier.dense_start and n != target:
            found.append(f"{n} active weights, the target is {target}")
        if found:
            broken.append(f"{weight.name}: {'; '.join(found)}")
    if broken:
        raise InvariantError("sparsity invariants broken in " + " | ".join(broken))
