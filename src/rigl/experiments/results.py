"""The results table of a sweep: mean ± std over seeds, in the paper's layout.

Rows are methods (``RigL 5x`` for longer runs, the distribution in the name when the
sweep has several), columns are sparsities, followed by the training and inference
FLOPs as multiples of the dense model (REFERENCE section 4).

Units: accuracies are stored as fractions in [0, 1] everywhere (``final.json``,
``metrics.csv``, ``results.json`` records and summary); tables and plots show percent
and say so in their headers and axis labels.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rigl.experiments.runio import atomic_write_text

DENSE = "dense"


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
    accs = [r["test_accuracy"] for r in recs]  # fractions
    return {
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "n": len(accs),
        "seeds": [r["seed"] for r in recs],
        "train_flops_ratio": statistics.fmean(r["train_flops_ratio"] for r in recs),
        "inference_flops_ratio": statistics.fmean(r["inference_flops_ratio"] for r in recs),
        "params": round(statistics.fmean(r["params"] for r in recs)),
    }


def cell_for(row: dict[str, Any], sparsity: float) -> dict[str, Any] | None:
    """The dense row's single cell stands in every sparsity column."""
    cells = row["cells"]
    return cells.get(DENSE) or cells.get(f"{sparsity:g}")


def markdown(rows: list[dict[str, Any]], sparsities: list[float]) -> str:
    """Test accuracy (%) mean ± std over seeds; FLOPs as multiples of dense."""
    levels = [f"{100 * s:g}%" for s in sparsities]
    header = ["Method", *[f"test acc. % at {lv}" for lv in levels]]
    header += [f"train FLOPs {lv}" for lv in levels] + [f"test FLOPs {lv}" for lv in levels]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [cell_for(row, s) for s in sparsities]
        acc = [_accuracy(c) for c in cells]
        train = [_ratio(c, "train_flops_ratio") for c in cells]
        test = [_ratio(c, "inference_flops_ratio") for c in cells]
        lines.append("| " + " | ".join([row["row"], *acc, *train, *test]) + " |")
    return "\n".join(lines)


def _accuracy(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "-"
    mean, std = 100 * cell["accuracy_mean"], 100 * cell["accuracy_std"]
    return f"{mean:.1f}" if cell["n"] == 1 else f"{mean:.1f} ± {std:.1f}"


def _ratio(cell: dict[str, Any] | None, key: str) -> str:
    return "-" if cell is None else f"{cell[key]:.2f}x"


def write_markdown(
    path: Path, table: str, plan: Any, meta: dict[str, Any], records: list[dict[str, Any]]
) -> None:
    base = plan.base
    seeds = plan.settings.get("seeds", [])
    steps = sorted({r["total_steps"] for r in records if r["multiplier"] == 1})
    text = [
        f"# {base.dataset}: {base.model}, {len(records)} runs",
        "",
        table,
        "",
        f"Test accuracy in %, mean ± sample std over {len(seeds)} seeds ({seeds}); "
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
        "- plots: `accuracy_vs_sparsity.png`, `accuracy_vs_train_flops.png`; "
        "per-run folders under `runs/`",
        "",
    ]
    atomic_write_text(path, "\n".join(text))
