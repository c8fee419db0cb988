"""What a sparsifier reports per layer, and the plain-text table of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerSummary:
    name: str
    shape: tuple[int, ...]
    density: float
    n_active: int
    n_total: int


def summary_table(rows: Sequence[LayerSummary]) -> str:
    """One line per layer (name, shape, density, active, total) and a total line; each
    column is as wide as its longest entry, so long names never push the others out."""
    active = sum(s.n_active for s in rows)
    total = sum(s.n_total for s in rows)
    cells = [
        (
            s.name,
            "x".join(map(str, s.shape)),
            f"{s.density:.4f}",
            f"{s.n_active:,}",
            f"{s.n_total:,}",
        )
        for s in rows
    ]
    cells.append(
        ("total", "", f"{active / total:.4f}" if total else "-", f"{active:,}", f"{total:,}")
    )
    name_w = max(len("layer"), *(len(c[0]) for c in cells))
    shape_w = max(len("shape"), *(len(c[1]) for c in cells))
    count_w = max(12, len(f"{total:,}"))

    def line(name: str, shape: str, density: str, n_active: str, n_total: str) -> str:
        return (
            f"{name:<{name_w}} {shape:<{shape_w}} {density:>8} "
            f"{n_active:>{count_w}} {n_total:>{count_w}}"
        )

    return "\n".join(line(*c) for c in [("layer", "shape", "density", "active", "total"), *cells])
