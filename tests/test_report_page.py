"""What a reader of `rigl report` and `rigl compare` sees: distinct legend labels, the
first-layer figure's axes and shared scale, the constant-inputs column, the page title,
and one accuracy unit (fractions in files, percent in tables and plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rigl.experiments.reports.figures import draw_first_layer
from rigl.experiments.reports.report import _constant_share, _run_table, page_title, write_html
from rigl.experiments.reports.rundata import RunData, unique_labels
from rigl.experiments.sweeps.results import markdown, summarise

RIGL_90 = {"dataset": "mnist1d", "model": "mlp", "method": "rigl", "distribution": "erk",
           "sparsity": 0.9}  # fmt: skip


def make_run(path: Path, steps: int, accuracy: float = 0.8, **config) -> RunData:
    return RunData(
        path=path,
        config={**RIGL_90, **config},
        final={"total_steps": steps, "test_accuracy": accuracy},
    )


def test_runs_with_one_label_get_distinct_ones(tmp_path):
    short, long = make_run(tmp_path / "a", 100), make_run(tmp_path / "b", 500)
    static = make_run(tmp_path / "c", 100, method="static")
    unique_labels([short, long, static])
    assert [r.label for r in (short, long, static)] == [
        "rigl erk 90% (100 steps)", "rigl erk 90% (500 steps)", "static erk 90%"
    ]  # fmt: skip
    seed0, seed1 = make_run(tmp_path / "seed0", 100), make_run(tmp_path / "seed1", 100)
    unique_labels([seed0, seed1])  # same length: the folder tells them apart
    assert [r.label for r in (seed0, seed1)] == ["rigl erk 90% (seed0)", "rigl erk 90% (seed1)"]


def test_first_layer_figure_shares_its_scale_and_labels_its_axes(tmp_path):
    runs = []
    for name, top in (("static", 3), ("rigl", 12)):
        run = make_run(tmp_path / name, 100, method=name)
        counts = np.zeros((3, 40), dtype=np.int32)  # (snapshots, MNIST-1D's 40 inputs)
        counts[:, 5] = top
        run.first_layer = {"steps": np.array([0, 50, 100]), "counts": counts}
        runs.append(run)
    fig = draw_first_layer(runs)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.has_data()]
    assert len(axes) == 6
    assert {ax.get_ylim() for ax in axes} == {(0.0, 12.0)}  # one y scale for every row
    assert "input feature" in fig.get_supxlabel()
    ylabels = [ax.get_ylabel() for ax in axes if ax.get_ylabel()]
    assert ylabels == ["static erk 90%\nconnections", "rigl erk 90%\nconnections"]


def test_constant_inputs_column_says_why_it_has_no_number(tmp_path):
    run = make_run(tmp_path / "r", 100)
    assert _constant_share(run).startswith("n/a: no first-layer record")
    run.first_layer = {"steps": np.array([0]), "counts": np.ones((1, 40), dtype=np.int32)}
    run.config = {**RIGL_90, "data_root": str(tmp_path), "dataset_options": {"num_samples": 200}}
    assert _constant_share(run) == "none: all 40 inputs vary over the training set"
    run.config = {**RIGL_90, "dataset": "mnist", "data_root": str(tmp_path / "missing"),
                  "dataset_options": {"download": False}}  # fmt: skip
    assert _constant_share(run) == "n/a: the dataset cannot be loaded here"


def test_page_title_and_table_name_the_runs_and_the_unit(tmp_path):
    runs = [make_run(tmp_path / "s", 100, 0.7512, method="static"), make_run(tmp_path / "r", 100)]
    assert page_title(runs) == "Sparse training of mlp on mnist1d: static erk 90%, rigl erk 90%"
    table = _run_table(runs)
    assert "<th>test accuracy (%)</th>" in table and "<td>75.12</td>" in table
    write_html(runs, tmp_path, [], [], embed=False)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<title>Sparse training of mlp on mnist1d: static" in page
    assert "rigl report</title>" not in page


def test_results_store_fractions_and_tables_show_percent():
    records = [
        {"row": "RigL", "method": "rigl", "distribution": "erk", "multiplier": 1.0,
         "sparsity": 0.9, "seed": seed, "test_accuracy": acc, "params": 10,
         "train_flops_ratio": 0.5, "inference_flops_ratio": 0.25}
        for seed, acc in ((0, 0.80), (1, 0.84))
    ]  # fmt: skip
    rows = summarise(records, [0.9])
    cell = rows[0]["cells"]["0.9"]
    assert abs(cell["accuracy_mean"] - 0.82) < 1e-12  # the unit of final.json: a fraction
    table = markdown(rows, [0.9]).splitlines()
    assert "test acc. % at 90%" in table[0] and "| RigL | 82.0 ± 2.8 |" in table[2]
