"""`rigl report RUN_DIR [RUN_DIR ...] [--out DIR]`: figures and one HTML page per set of runs.

What it draws (each figure only when some run has the data):

- ``first_layer.png``: the first sparsified layer's active connections per input
  feature at a few snapshots (28x28 heatmaps for MNIST, 1-D profiles for MNIST-1D);
  needs the ``dynamics`` recorder (``recorders: [topology, dynamics]``).
- ``density.png``: per-layer density, one bar per distinct allocation (uniform vs ERK).
- ``dynamics.png``: drop fraction, exploration (fraction of weights ever active) and
  survival of grown connections (``dynamics`` recorder).
- ``training.png``: loss, accuracy, learning rate and drop fraction (``metrics.csv``).
- ``interpolation.png``: loss/accuracy along ``(1-a) θ_A + a θ_B`` between two final
  checkpoints, by default a Static and a RigL run at the same sparsity (``--pair``).

``index.html`` references the PNGs by relative path (``--embed`` inlines them as
base64 instead) and carries its own CSS: no external file, no script.
"""

from __future__ import annotations

import argparse
import base64
import html
import os
from pathlib import Path
from typing import Any

from rigl.config import ConfigError
from rigl.experiments.reports import figures
from rigl.experiments.reports.rundata import (
    RunData,
    constant_inputs,
    find_key,
    load_run,
    share_on,
    unique_labels,
)
from rigl.experiments.runio import atomic_write_text, claim_output_folder

FIGURES = {  # file -> (title, caption)
    "first_layer.png": (
        "First-layer connectivity",
        "Active connections of each input feature (mask summed over the first layer's "
        "output units) at evenly spaced snapshots. A static mask keeps its random "
        "initial pattern; a dynamic method moves connections towards informative inputs.",
    ),
    "density.png": (
        "Per-layer density",
        "Fraction of each sparsified layer's weights that is active at the end of training.",
    ),
    "dynamics.png": (
        "Mask dynamics",
        "Left: the schedule's drop fraction f_decay(t) and, as dots, the fraction of each "
        "layer's connections actually replaced at each update (a connection dropped and "
        "regrown at once is not counted). Middle: fraction of each layer's weights that "
        "were active at least once. Right: Kaplan-Meier survival of connections grown "
        "during training (solid) and of the initial ones (dashed) over the update period.",
    ),
    "training.png": (
        "Training curves",
        "Training loss (per logged step), test loss and accuracy (per epoch), learning rate "
        "and the drop fraction of the topology-update schedule.",
    ),
    "interpolation.png": (
        "Linear interpolation between two solutions",
        "Loss and accuracy of θ(a) = (1-a) θ_A + a θ_B on the train and test sets. Points "
        "between the ends use the union of both masks, so they are denser than either "
        "solution (as in the RigL paper's interpolation figure).",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Draw the mask dynamics, densities, training curves and the Static-RigL "
        "interpolation of finished (or running) runs into PNGs and index.html."
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders of rigl train")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report, or "
                        "<common parent>/report for several runs)")  # fmt: skip
    parser.add_argument(
        "--pair",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="the two runs to interpolate between (default: a static and a rigl run "
        "of the same sparsity among RUN_DIR)",
    )
    parser.add_argument("--no-interpolation", action="store_true", help="skip the interpolation")
    parser.add_argument(
        "--points", type=int, default=29, help="interpolation points in [-0.2, 1.2]"
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        help="evaluate the interpolation on at most N examples per split",
    )
    parser.add_argument("--embed", action="store_true", help="inline the PNGs into index.html")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.runs)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {str(out)!r} is a file; give a folder for the figures and index.html "
            "(it is created if missing)"
        )
    runs = [load_run(p) for p in args.runs]
    pair = [load_run(p) for p in args.pair] if args.pair else None
    claim_output_folder(out, "report", _written_by_report)  # after the runs are checked
    made = build_report(
        runs,
        out,
        pair=pair,
        interpolation=not args.no_interpolation,
        points=args.points,
        max_examples=args.max_examples,
        embed=args.embed,
    )
    print(f"report: {len(made)} figures -> {out / 'index.html'}")
    return 0


def _written_by_report(out: Path) -> bool:
    """A report folder from before the marker: our index.html (its style sheet) beside
    figures and the interpolation table."""
    page = out / "index.html"
    if not page.is_file() or CSS.strip().splitlines()[0] not in page.read_text(errors="replace"):
        return False
    known = {"index.html", "interpolation.csv"}
    return all(p.name in known or p.suffix == ".png" for p in out.iterdir())


def default_out(paths: list[str]) -> Path:
    if len(paths) == 1:
        return Path(paths[0]) / "report"
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths])) / "report"


def build_report(
    runs: list[RunData],
    out: Path,
    *,
    pair: list[RunData] | None = None,
    interpolation: bool = True,
    points: int = 29,
    max_examples: int | None = None,
    embed: bool = False,
) -> list[str]:
    """Write the figures and ``index.html`` into ``out``; returns the figure files made."""
    out.mkdir(parents=True, exist_ok=True)
    unique_labels(runs + list(pair or []))
    makers = {
        "first_layer.png": figures.first_layer_figure,
        "density.png": figures.density_figure,
        "dynamics.png": figures.dynamics_figure,
        "training.png": figures.training_figure,
    }
    made = [name for name, make in makers.items() if make(runs, out / name)]
    notes: list[str] = []
    if interpolation:
        notes += _interpolation(runs, pair, out, points, max_examples, made)
    write_html(runs, out, made, notes, embed)
    return made


def _interpolation(runs, pair, out, points, max_examples, made) -> list[str]:
    import numpy as np

    from rigl.experiments.reports import interp

    chosen = tuple(pair) if pair else interp.pick_pair(runs)
    if chosen is None:
        return ["No interpolation: no static and rigl runs of the same sparsity (use --pair)."]
    a, b = chosen
    model, state_a, state_b, splits = interp.load_pair(a, b, max_examples)
    alphas = np.round(np.linspace(-0.2, 1.2, points), 4) + 0.0  # + 0.0: no -0
    curve = interp.interpolation_curve(model, state_a, state_b, splits, alphas)
    interp.write_points(curve, out / "interpolation.csv")
    interp.interpolation_figure(curve, (a.label, b.label), out / "interpolation.png")
    made.append("interpolation.png")
    return [f"Interpolation: A = {a.path.name} ({a.label}), B = {b.path.name} ({b.label}); "
            "values in interpolation.csv."]  # fmt: skip


# -- the HTML page ----------------------------------------------------------------------------
CSS = """
body { font-family: sans-serif; max-width: 1300px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
p.caption { color: #555; max-width: 60em; }
"""


def write_html(
    runs: list[RunData], out: Path, figures: list[str], notes: list[str], embed: bool
) -> None:
    heading = html.escape(page_title(runs))
    parts = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{heading}</h1>",
        _run_table(runs),
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    for name in figures:
        title, caption = FIGURES[name]
        src = name
        if embed:
            src = "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode()
        parts += [
            f'<h2 id="{name[:-4]}">{html.escape(title)}</h2>',
            f'<img src="{src}" alt="{name}">',
            f'<p class="caption">{html.escape(caption)}</p>',
        ]
    parts.append("</body></html>")
    atomic_write_text(out / "index.html", "\n".join(parts) + "\n")


def page_title(runs: list[RunData]) -> str:
    """``Sparse training of mlp on mnist1d: static erk 90%, rigl erk 90%``."""
    setups = [(find_key(r.config, "model"), find_key(r.config, "dataset")) for r in runs]
    known = list(dict.fromkeys(f"{m} on {d}" for m, d in setups if m and d))
    what = f" of {', '.join(known)}" if known else ""
    return f"Sparse training{what}: {', '.join(r.label for r in runs)}"


def _run_table(runs: list[RunData]) -> str:
    head = ["run", "method", "sparsity", "distribution", "steps", "test accuracy (%)",
            "explored (sparse layers)", "first layer on constant inputs: start → end"]  # fmt: skip
    rows = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for run in runs:
        cells = [
            run.path.name,
            run.method,
            "" if run.sparsity is None else f"{run.sparsity:g}",
            run.distribution,
            str(run.final.get("total_steps", "")),
            _fmt(run.final.get("test_accuracy")),
            _explored(run),
            _constant_share(run),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "\n".join([*rows, "</table>"])


def _fmt(value: Any) -> str:
    """An accuracy (stored as a fraction, like every file of a run) in percent."""
    return f"{100 * value:.2f}" if isinstance(value, int | float) else ""


def _explored(run: RunData) -> str:
    """Weights ever active / all weights, over the layers that are not dense."""
    last: dict[str, dict[str, str]] = {}
    for row in run.dynamics:
        last[row["layer"]] = row
    sparse = [r for r in last.values() if r["n_active"] != r["n_total"]]
    if not sparse:
        return ""
    total = sum(int(r["n_total"]) for r in sparse)
    ever = sum(float(r["explored"]) * int(r["n_total"]) for r in sparse)
    return f"{ever / total:.3f}"


def _constant_share(run: RunData) -> str:
    """Share of first-layer connections on inputs that never vary (MNIST's blank border)."""
    if run.first_layer is None:
        return "n/a: no first-layer record (recorder 'dynamics' off)"
    counts = run.first_layer["counts"]  # (T, n_inputs)
    constant = constant_inputs(run.config)
    if constant is None:
        return "n/a: the dataset cannot be loaded here"
    if constant.shape[0] != counts.shape[1]:
        return "n/a: the first layer does not read the raw inputs"
    if not constant.any():
        return f"none: all {constant.size} inputs vary over the training set"
    start, end = share_on(counts[0], constant), share_on(counts[-1], constant)
    return f"{start:.3f} → {end:.3f} ({int(constant.sum())} of {constant.size} inputs)"
