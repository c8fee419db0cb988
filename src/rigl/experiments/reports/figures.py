"""The report's figures, one function per PNG; each returns False when no run has the data.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): no global
state and no GUI backend, so the report runs headless and leaves the caller's
matplotlib settings alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rigl.experiments.reports.rundata import (
    RunData,
    column,
    layer_series,
    survival_curve,
)
from rigl.registry import is_dense

DPI = 90
FRAMES = 6  # snapshots shown per run in the first-layer grid


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def _plain_log_labels(ax) -> None:
    """Ticks at 1, 2, 5 x 10^k labelled 0.5, 1, 2 (not 5x10^-1) on a log axis."""
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _colors() -> list[str]:
    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def _frame_indices(n: int, k: int = FRAMES) -> list[int]:
    """``k`` snapshot indices spread evenly over ``n`` (first and last included)."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(n, k))})


def first_layer_figure(runs: list[RunData], path: Path) -> bool:
    fig = draw_first_layer(runs)
    if fig is not None:
        _save(fig, path)
    return fig is not None


def draw_first_layer(runs: list[RunData]) -> Figure | None:
    """Grid: one row per run, columns = snapshots of active connections per input, on one
    colour / y scale for all rows (so runs compare by eye)."""
    runs = [r for r in runs if r.first_layer is not None and len(r.first_layer["steps"])]
    if not runs:
        return None
    cols = max(len(_frame_indices(len(r.first_layer["steps"]))) for r in runs)
    fig = Figure(figsize=(1.9 * cols + 0.9, 2.0 * len(runs) + 0.4), layout="constrained")
    axes = fig.subplots(len(runs), cols, squeeze=False)
    vmax = max(1, max(int(r.first_layer["counts"].max()) for r in runs))
    images = False
    for row, run in zip(axes, runs, strict=True):
        steps, counts = run.first_layer["steps"], run.first_layer["counts"]  # (T,), (T, n_in)
        n_in = counts.shape[1]
        side = math.isqrt(n_in)
        square = side * side == n_in and side >= 8  # square image input (MNIST: 28x28)
        images |= square
        picks = _frame_indices(len(steps))
        for ax, i in zip(row, picks, strict=False):
            if square:
                im = ax.imshow(counts[i].reshape(side, side), cmap="viridis", vmin=0, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
            else:  # 1-D input (MNIST-1D: 40 features): a profile
                ax.bar(np.arange(n_in), counts[i], width=1.0, color="tab:blue")
                ax.set_ylim(0, vmax)
                ax.tick_params(labelsize=6)
                if ax is not row[0]:
                    ax.tick_params(labelleft=False)
            ax.set_title(f"step {int(steps[i])}", fontsize=8)
        for ax in row[len(picks) :]:
            ax.axis("off")
        row[0].set_ylabel(run.label if square else f"{run.label}\nconnections", fontsize=8)
        if square:
            fig.colorbar(im, ax=list(row), shrink=0.8, label="active connections")
    fig.supxlabel(
        "input pixel (image layout); colour: active connections from that input"
        if images
        else "input feature; bar height: active connections from that input",
        fontsize=8,
    )
    fig.suptitle("First layer: active connections per input over training", fontsize=10)
    return fig


def density_figure(runs: list[RunData], path: Path) -> bool:
    """Per-layer density bars; runs with identical densities (same distribution) share a bar."""
    groups: dict[tuple, list[str]] = {}
    layers: list[str] = []
    for run in runs:
        if not run.densities or is_dense(run.method):
            continue
        key = tuple(sorted(run.densities.items()))
        groups.setdefault(key, []).append(
            f"{run.distribution} {100 * run.sparsity:g}%" if run.sparsity is not None else run.label
        )
        layers += [name for name in run.densities if name not in layers]
    if not groups:
        return False
    fig = Figure(figsize=(max(5.0, 1.4 * len(layers) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(groups)
    for g, (key, labels) in enumerate(groups.items()):
        dens = dict(key)
        values = [dens.get(name, np.nan) for name in layers]
        x = np.arange(len(layers)) + (g - (len(groups) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=" / ".join(dict.fromkeys(labels)))
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(layers)), layers, fontsize=8)
    ax.set_ylabel("density (fraction of weights active)")
    ax.set_ylim(0, 1.1)
    ax.set_title("Per-layer density", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def dynamics_figure(runs: list[RunData], path: Path) -> bool:
    """Drop fraction, exploration and survival; colour = run, line style = layer / origin."""
    runs = [r for r in runs if r.dynamics]
    if not runs:
        return False
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_drop, ax_exp, ax_surv = fig.subplots(1, 3)
    layers: list[str] = []  # every sparse layer of every run, in order: its style index
    for run, color in zip(runs, _colors() * len(runs), strict=False):
        sparse = _sparse_layers(run)
        layers += [name for name in sparse if name not in layers]
        first = run.dynamics[0]["layer"]
        steps, frac = column(
            [r for r in run.dynamics if r["layer"] == first], "step", "drop_fraction"
        )
        ax_drop.plot(steps, frac, color=color)
        drops = layer_series(run, "realized_drop_fraction")
        for name in sparse:
            s, v = drops[name]
            marker = MARKERS[layers.index(name) % len(MARKERS)]
            keep = s > s.min() if len(s) else s  # the start row is not an update
            ax_drop.plot(s[keep], v[keep], marker, ms=3, color=color, ls="none")
        end = run.final.get("total_steps")
        explored = layer_series(run, "explored")
        for name in sparse:
            s, v = explored[name]
            if isinstance(end, int) and len(s) and end > s[-1]:  # flat after the last update
                s, v = np.append(s, end), np.append(v, v[-1])
            ax_exp.plot(s, v, STYLES[layers.index(name) % len(STYLES)], color=color)
        for origin, style in (("grown", "-"), ("initial", "--")):
            x, y = survival_curve(run, origin)
            if len(x) > 1:
                ax_surv.step(x, y, style, where="post", color=color)
    _style_legend(ax_drop, [("f_decay(t)", "-", "")] + [
        (f"realized: {n}", "none", MARKERS[i % len(MARKERS)]) for i, n in enumerate(layers)
    ])  # fmt: skip
    _style_legend(ax_exp, [(n, STYLES[i % len(STYLES)], "") for i, n in enumerate(layers)])
    _style_legend(ax_surv, [("grown during training", "-", ""), ("initial mask", "--", "")])
    ax_drop.set(xlabel="step", ylabel="fraction of active weights", title="Drop fraction")
    ax_exp.set(xlabel="step", ylabel="fraction of weights ever active", title="Exploration")
    ax_surv.set(xlabel="lifetime (steps)", ylabel="fraction still active", title="Survival")
    ax_surv.set_ylim(0, 1.02)
    _run_legend(fig, runs)
    _save(fig, path)
    return True


STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "v", "D"]


def _style_legend(ax, entries: list[tuple[str, str, str]]) -> None:
    """Legend of line styles / markers in grey: (label, linestyle, marker)."""
    handles = [
        Line2D([], [], color="grey", ls=style, marker=marker, ms=4, label=label)
        for label, style, marker in entries
    ]
    ax.legend(handles=handles, fontsize=7)


def _run_legend(fig: Figure, runs: list[RunData]) -> None:
    """One legend for the whole figure: colour = run."""
    handles = [
        Line2D([], [], color=color, lw=2, label=run.label)
        for run, color in zip(runs, _colors() * len(runs), strict=False)
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 5), fontsize=8)


def _sparse_layers(run: RunData) -> list[str]:
    """Layers of ``dynamics.csv`` that are not dense (a dense layer never moves)."""
    layers = dict.fromkeys(r["layer"] for r in run.dynamics)
    dense = {r["layer"] for r in run.dynamics if r["n_active"] == r["n_total"]}
    return [name for name in layers if name not in dense]


def training_figure(runs: list[RunData], path: Path) -> bool:
    """Loss, accuracy, learning rate and drop fraction from ``metrics.csv``; colour = run."""
    runs = [r for r in runs if r.metrics]
    if not runs:
        return False
    fig = Figure(figsize=(13, 3.5), layout="constrained")
    ax_loss, ax_acc, ax_lr, ax_drop = fig.subplots(1, 4)
    for run, color in zip(runs, _colors() * len(runs), strict=False):
        steps = [r for r in run.metrics if r.get("kind") == "step"]
        epochs = [r for r in run.metrics if r.get("kind") == "epoch"]
        ax_loss.plot(*column(steps, "step", "loss"), color=color, lw=0.7, alpha=0.6)
        ax_loss.plot(*column(epochs, "step", "test_loss"), "o--", ms=2.5, color=color)
        ax_acc.plot(*_percent(column(epochs, "step", "train_accuracy")), "-", color=color)
        ax_acc.plot(*_percent(column(epochs, "step", "test_accuracy")), "o--", ms=2.5, color=color)
        ax_lr.plot(*column(steps, "step", "lr"), color=color)
        ax_drop.plot(*column(steps, "step", "drop_fraction"), color=color)
    ax_loss.set_yscale("log")
    _plain_log_labels(ax_loss)
    ax_lr.ticklabel_format(axis="y", useOffset=False)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="Loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="Accuracy (per epoch)")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax_drop.set(xlabel="step", ylabel="f_decay(t)", title="Drop fraction of the schedule")
    _style_legend(ax_loss, [("train (logged steps)", "-", ""), ("test (epochs)", "--", "o")])
    _style_legend(ax_acc, [("train (epoch mean)", "-", ""), ("test", "--", "o")])
    _run_legend(fig, runs)
    _save(fig, path)
    return True


def _percent(series: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(x, accuracy as a fraction) -> (x, accuracy in %): files store fractions."""
    return series[0], 100 * series[1]
