"""Plots of a sweep (matplotlib, Agg backend): accuracy vs sparsity and vs training FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rigl.experiments.results import DENSE, cell_for


def plot_all(
    records: list[dict[str, Any]], rows: list[dict[str, Any]], sparsities: list[float], out: Path
) -> list[Path]:
    return [
        accuracy_vs_sparsity(rows, sparsities, out / "accuracy_vs_sparsity.png"),
        accuracy_vs_train_flops(rows, sparsities, out / "accuracy_vs_train_flops.png"),
    ]


def _is_dense(row: dict[str, Any]) -> bool:
    """The dense baseline's row (one cell for every sparsity column)."""
    return DENSE in row["cells"]


def _dense_band(ax: Any, row: dict[str, Any]) -> None:
    cell = row["cells"][DENSE]
    mean, std = 100 * cell["accuracy_mean"], 100 * cell["accuracy_std"]  # stored as fractions
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=row["row"])
    ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)


def accuracy_vs_sparsity(rows: list[dict[str, Any]], sparsities: list[float], path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against sparsity, one line per table row."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        if _is_dense(row):
            _dense_band(ax, row)
            continue
        points = [(100 * s, cell_for(row, s)) for s in sparsities]
        points = [(x, c) for x, c in points if c is not None]
        xs = [x for x, _ in points]
        ax.errorbar(
            xs,
            [100 * c["accuracy_mean"] for _, c in points],
            yerr=[100 * c["accuracy_std"] for _, c in points],
            marker="o",
            capsize=3,
            label=row["row"],
        )
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks([100 * s for s in sparsities])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def accuracy_vs_train_flops(
    rows: list[dict[str, Any]], sparsities: list[float], path: Path
) -> Path:
    """Test accuracy against training FLOPs (multiples of dense training), log x axis."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        cells = (
            [cell_for(row, s) for s in sparsities] if not _is_dense(row) else [row["cells"][DENSE]]
        )
        cells = [c for c in cells if c is not None]
        ax.errorbar(
            [c["train_flops_ratio"] for c in cells],
            [100 * c["accuracy_mean"] for c in cells],
            yerr=[100 * c["accuracy_std"] for c in cells],
            marker="s" if _is_dense(row) else "o",
            linestyle="none" if _is_dense(row) else "-",
            color="black" if _is_dense(row) else None,
            capsize=3,
            label=row["row"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (x dense)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import io

    from rigl.experiments.runio import atomic_write_bytes

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
