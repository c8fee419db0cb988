"""The results table of a sweep: mean ± std over seeds, in the paper's layout.

Rows are methods (``RigL 5x`` for longer runs, the distribution in the name when the
sweep has several), columns are sparsities, followed by the training and inference
FLOPs as multiples of the dense model (REFERENCE section 4).

Units: accuracies are stored as fractions in [0, 1] everywhere (``final.json``,
``metrics.csv``, ``results.json`` records and summary); tables and plots show percent
and say so in their headers and axis labels. A sweep on character-level data (its runs
report ``test_bpc``) is tabled and plotted in bits per character instead (lower is better).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rigl.experiments.runio import atomic_write_text

DENSE = "dense"


@dataclass(frozen=True)
class Metric:
    """The number a sweep's table and plots show: ``key`` in ``final.json``, summarised
    per cell as ``<name>_mean`` / ``<name>_std`` (stored units), shown times ``scale``."""

    name: str
    key: str
    label: str  # table header and axis label
    scale: float
    higher_is_better: bool
    digits: int  # decimals shown
    unit: str  # after a single value, e.g. in progress lines

    def shown(self, cell: dict[str, Any]) -> tuple[float, float]:
        """(mean, std) of a cell in the shown unit."""
        return self.scale * cell[f"{self.name}_mean"], self.scale * cell[f"{self.name}_std"]

    def text(self, final: dict[str, Any]) -> str:
        """One run's value (``final.json``) in the shown unit, e.g. ``85.4%``."""
        return f"{self.scale * final[self.key]:.{self.digits}f}{self.unit}"


ACCURACY = Metric("accuracy", "test_accuracy", "test accuracy (%)", 100.0, True, 1, "%")
BPC = Metric("bpc", "test_bpc", "test bits per character", 1.0, False, 3, " bits/char")
METRICS = (ACCURACY, BPC)


def metric_of(records: list[dict[str, Any]]) -> Metric:
    """Bits per character where every run reports them (character-level data), else accuracy."""
    if records and all(r.get(BPC.key) is not None for r in records):
        return BPC
    return ACCURACY


def summarise(records: list[dict[str, Any]], sparsities: list[float]) -> list[dict[str, Any]]:
    """One row per table row: per sparsity, accuracy mean/std/n and the FLOPs ratios."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(
            rec["row"],
            {
                "row": rec["row"],
                "method": rec["method"],
                "distribution": rec["distribution"],
                "multiplier": rec["multiplier"],
                "cells": {},
            },
        )
        key = DENSE if rec["sparsity"] == 0 else f"{rec['sparsity']:g}"
        row["cells"].setdefault(key, []).append(rec)
    for row in rows.values():
        row["cells"] = {key: _cell(recs) for key, recs in row["cells"].items()}
    return list(rows.values())


def _cell(recs: list[dict[str, Any]]) -> dict[str, Any]:
    stats = {}
    for metric in METRICS:  # stored units (accuracy: fractions)
        values = [r.get(metric.key) for r in recs]
        if all(v is not None for v in values):
            stats[f"{metric.name}_mean"] = statistics.fmean(values)
            stats[f"{metric.name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        **stats,
        "n": len(recs),
        "seeds": [r["seed"] for r in recs],
        "train_flops_ratio": statistics.fmean(r["train_flops_ratio"] for r in recs),
        "inference_flops_ratio": statistics.fmean(r["inference_flops_ratio"] for r in recs),
        "params": round(statistics.fmean(r["params"] for r in recs)),
    }


def cell_for(row: dict[str, Any], sparsity: float) -> dict[str, Any] | None:
    """The dense row's single cell stands in every sparsity column."""
    cells = row["cells"]
    return cells.get(DENSE) or cells.get(f"{sparsity:g}")


def markdown(rows: list[dict[str, Any]], sparsities: list[float], metric: Metric = ACCURACY) -> str:
    """The metric (test accuracy in %) mean ± std over seeds; FLOPs as multiples of dense."""
    levels = [f"{100 * s:g}%" for s in sparsities]
    short = "test acc. %" if metric is ACCURACY else "test bits/char"
    header = ["Method", *[f"{short} at {lv}" for lv in levels]]
    header += [f"train FLOPs {lv}" for lv in levels] + [f"test FLOPs {lv}" for lv in levels]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [cell_for(row, s) for s in sparsities]
        acc = [_shown(c, metric) for c in cells]
        train = [_ratio(c, "train_flops_ratio") for c in cells]
        test = [_ratio(c, "inference_flops_ratio") for c in cells]
        lines.append("| " + " | ".join([row["row"], *acc, *train, *test]) + " |")
    return "\n".join(lines)


def _shown(cell: dict[str, Any] | None, metric: Metric) -> str:
    if cell is None:
        return "-"
    mean, std = metric.shown(cell)
    d = metric.digits
    return f"{mean:.{d}f}" if cell["n"] == 1 else f"{mean:.{d}f} ± {std:.{d}f}"


def _ratio(cell: dict[str, Any] | None, key: str) -> str:
    return "-" if cell is None else f"{cell[key]:.2f}x"


def write_markdown(
    path: Path,
    table: str,
    plan: Any,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    metric: Metric = ACCURACY,
) -> None:
    base = plan.base
    seeds = plan.settings.get("seeds", [])
    steps = sorted({r["total_steps"] for r in records if r["multiplier"] == 1})
    text = [
        f"# {base.dataset}: {base.model}, {len(records)} runs",
        "",
        table,
        "",
        f"{metric.label[0].upper() + metric.label[1:]} "
        f"({'higher' if metric.higher_is_better else 'lower'} is better), mean ± sample std "
        f"over {len(seeds)} seeds ({seeds}); "
        "FLOPs are multiples of the dense model's (training: whole run, extended runs "
        "included; test: one forward pass), with the paper's conventions (`rigl.flops`).",
        "",
        f"- training: {base.optimizer} lr {base.lr:g} ({base.lr_schedule}), batch "
        f"{base.batch_size}, {steps} steps at 1x; ΔT {base.update_interval}, "
        f"α {base.drop_fraction:g}, T_end {base.end_step}",
        f"- wall time: {meta['wall_time_s']:.0f} s with {meta['jobs']} parallel jobs "
        f"({meta['cpu_count']} CPUs; runs skipped as finished take no time); CPU time of "
        f"all runs {meta['cpu_time_s']:.0f} s; git {meta['git']}; "
        f"torch {meta['versions']['torch']}",
        f"- plots: `{metric.name}_vs_sparsity.png`, `{metric.name}_vs_train_flops.png`; "
        "per-run folders under `runs/`",
        "",
    ]
    atomic_write_text(path, "\n".join(text))
