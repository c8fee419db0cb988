"""What a sparsifier reports about its layers, and the on-demand invariant check.

``summary()`` puts the measured density (non-zero entries now) beside the target one, so a
weight that went dense behind the sparsifier's back shows; it names the backend of every
layer and why (``backend="sparse"`` keeps some layers masked), ties and parametrizations.
The table's budget line compares the active weights with what the distribution asked for
(a structured pattern rounds every layer to whole rows, groups or tiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rigl.guard import InvariantError
from rigl.reserve import ReservedWeight

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
    # active weights the distribution asked for, before a structured pattern rounded the
    # count (None: not known, e.g. a row built by hand)
    requested: int | None = None


@dataclass(frozen=True)
class Budget:
    """The sparsified layers together: the active weights the distribution asked for
    (``requested``) against those active now (``active``, the bookkeeping counts), of
    ``total`` weights. A structured pattern rounds each layer to whole rows, groups or
    tiles, so the two may differ by a few units; unstructured they are equal (a method
    with a dense start has more active until its pruning ends)."""

    requested: int
    active: int
    total: int

    @property
    def requested_sparsity(self) -> float:
        return 1.0 - self.requested / self.total if self.total else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.active / self.total if self.total else 0.0

    @property
    def deviation(self) -> int:
        """Active weights beyond the request (negative: fewer)."""
        return self.active - self.requested

    @property
    def deviation_pp(self) -> float:
        """Sparsity minus the requested sparsity, in percentage points."""
        return 100.0 * (self.sparsity - self.requested_sparsity)

    def line(self) -> str:
        weights = "weight" if abs(self.deviation) == 1 else "weights"
        return (
            f"budget: requested sparsity {self.requested_sparsity:.4f} "
            f"({self.requested:,} active), achieved {self.sparsity:.4f} "
            f"({self.active:,} active): {self.deviation:+,} {weights}, "
            f"{self.deviation_pp:+.2f} pp"
        )


def budget(rows: list[LayerSummary]) -> Budget | None:
    """The :class:`Budget` of the summarised layers, or None if a row lacks ``requested``."""
    if not rows or any(r.requested is None for r in rows):
        return None
    return Budget(
        sum(r.requested or 0 for r in rows),
        sum(r.n_active for r in rows),
        sum(r.n_total for r in rows),
    )


def summarize(sparsifier: Sparsifier) -> list[LayerSummary]:
    rows = []
    for weight, target, (backend, why), requested in zip(
        sparsifier.weights,
        sparsifier.targets,
        sparsifier.layer_backends,
        sparsifier.requested_counts,
        strict=True,
    ):
        notes = [n for n in (why, target.note) if n]
        if weight.blocks > 1:
            notes.append(f"{weight.blocks} row blocks (q, k, v) keep their own counts")
        if isinstance(weight, ReservedWeight):
            n_trained = int(weight.trained.count_nonzero())
            notes.append(f"trains {n_trained} ({n_trained / weight.numel:.4f}): θ kept dense")
        if weight.pattern.structured:
            notes.append(f"pattern {weight.pattern}")
        elif sparsifier.config.parsed_pattern.structured and weight.n_active < weight.numel:
            notes.append(f"unstructured: cannot hold pattern {sparsifier.config.pattern}")
        rows.append(
            LayerSummary(
                weight.name,
                getattr(weight, "weight_shape", weight.shape),  # a compressed kernel's 4-D shape
                weight.density,
                weight.n_active,
                weight.numel,
                weight.n_nonzero / weight.numel,
                backend,
                "; ".join(notes),
                requested,
            )
        )
    return rows


def format_table(rows: list[LayerSummary], left_dense: dict[str, str]) -> str:
    """One line per layer and a total line, each column as wide as its longest entry (long
    names and huge counts never push the others out); the budget line (:class:`Budget`)
    when the rows know their requested counts; tied weights left dense below."""
    active, total = sum(r.n_active for r in rows), sum(r.n_total for r in rows)
    nonzero = sum(r.measured_density * r.n_total for r in rows)
    cells = [("layer", "shape", "density", "measured", "active", "total")]
    cells += [
        (
            r.name,
            "x".join(map(str, r.shape)),
            f"{r.density:.4f}",
            f"{r.measured_density:.4f}",
            f"{r.n_active:,}",
            f"{r.n_total:,}",
        )
        for r in rows
    ]
    ratio = (lambda n: f"{n / total:.4f}") if total else (lambda n: "-")
    cells.append(("total", "", ratio(active), ratio(nonzero), f"{active:,}", f"{total:,}"))
    widths = [max(len(c[i]) for c in cells) for i in range(6)]
    tails = [
        "  backend",
        *(f"  {r.backend}" + (f" ({r.note})" if r.note else "") for r in rows),
        "",
    ]
    lines = [
        " ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        + tail
        for row, tail in zip(cells, tails, strict=True)
    ]
    if (totals := budget(rows)) is not None:
        lines.append(totals.line())
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
