"""Plots of a sweep (matplotlib, Agg backend): its metric (accuracy, or bits per character)
vs sparsity and vs training FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rigl.experiments.sweeps.results import ACCURACY, DENSE, Metric, cell_for


def plot_all(
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    sparsities: list[float],
    out: Path,
    metric: Metric = ACCURACY,
) -> list[Path]:
    return [
        metric_vs_sparsity(rows, sparsities, out / f"{metric.name}_vs_sparsity.png", metric),
        metric_vs_train_flops(rows, sparsities, out / f"{metric.name}_vs_train_flops.png", metric),
    ]


def _is_dense(row: dict[str, Any]) -> bool:
    """The dense baseline's row (one cell for every sparsity column)."""
    return DENSE in row["cells"]


def _dense_band(ax: Any, row: dict[str, Any], metric: Metric) -> None:
    mean, std = metric.shown(row["cells"][DENSE])
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=row["row"])
    ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)


def metric_vs_sparsity(
    rows: list[dict[str, Any]], sparsities: list[float], path: Path, metric: Metric = ACCURACY
) -> Path:
    """The metric (mean ± std over seeds) against sparsity, one line per table row."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        if _is_dense(row):
            _dense_band(ax, row, metric)
            continue
        points = [(100 * s, cell_for(row, s)) for s in sparsities]
        points = [(x, c) for x, c in points if c is not None]
        shown = [metric.shown(c) for _, c in points]
        ax.errorbar(
            [x for x, _ in points],
            [mean for mean, _ in shown],
            yerr=[std for _, std in shown],
            marker="o",
            capsize=3,
            label=row["row"],
        )
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(metric.label)
    ax.set_xticks([100 * s for s in sparsities])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def metric_vs_train_flops(
    rows: list[dict[str, Any]], sparsities: list[float], path: Path, metric: Metric = ACCURACY
) -> Path:
    """The metric against training FLOPs (multiples of dense training), log x axis."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        cells = (
            [cell_for(row, s) for s in sparsities] if not _is_dense(row) else [row["cells"][DENSE]]
        )
        cells = [c for c in cells if c is not None]
        shown = [metric.shown(c) for c in cells]
        ax.errorbar(
            [c["train_flops_ratio"] for c in cells],
            [mean for mean, _ in shown],
            yerr=[std for _, std in shown],
            marker="s" if _is_dense(row) else "o",
            linestyle="none" if _is_dense(row) else "-",
            color="black" if _is_dense(row) else None,
            capsize=3,
            label=row["row"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (x dense)")
    ax.set_ylabel(metric.label)
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
