"""The mask-dynamics recorder and `rigl report`: bookkeeping invariants, files, figures."""

from __future__ import annotations

import io
import re

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rigl
from conftest import TinyMLP
from rigl.cli import main
from rigl.experiments.reports.figures import first_layer_figure
from rigl.experiments.reports.interp import interpolate_state
from rigl.experiments.reports.rundata import RunData, load_run, read_rows, survival_curve
from rigl.experiments.training.recorder import MaskRecorder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread

FIGURES = ["first_layer.png", "density.png", "dynamics.png", "training.png", "interpolation.png"]


def train_tiny(recorder: MaskRecorder | None, steps: int = 60, *, hooks: bool = True):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = rigl.create(
        "rigl", model, optimizer, sparsity=0.8, total_steps=steps, update_interval=5
    )
    if not hooks:
        sparsifier.update_hooks = ()  # a sparsifier without update hooks: the recorder polls
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(16, 12, generator=gen)  # (B, 12)
        y = x[:, :4].argmax(1)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sparsifier.step()
        if recorder is not None:
            recorder(step + 1, model, sparsifier, {"kind": "step"})
            recorder(step + 1, model, sparsifier, {"kind": "epoch"})  # a repeat is ignored
    return model, sparsifier


@pytest.mark.parametrize("hooks", [True, False], ids=["update-hook", "polling"])
def test_recorder_bookkeeping(tmp_path, hooks):
    recorder = MaskRecorder(tmp_path, snapshot_every=10)
    _, sparsifier = train_tiny(recorder, hooks=hooks)
    recorder.close()
    rows = read_rows(tmp_path / "dynamics.csv")
    updates = [r for r in rows if r["step"] != "0"]
    n_layers = len(sparsifier.weights)
    assert len(updates) == sparsifier.update_count * n_layers
    assert all(int(r["n_dropped"]) == int(r["n_grown"]) for r in updates)
    assert any(int(r["n_dropped"]) > 0 for r in updates)
    assert {int(r["step"]) % 5 for r in updates} == {0}  # labelled with the update step t
    for w in sparsifier.weights:
        mine = [r for r in rows if r["layer"] == w.name]
        explored = [float(r["explored"]) for r in mine]
        assert explored == sorted(explored) and explored[-1] >= w.density
        assert all(int(r["n_active"]) == w.n_active for r in mine)  # constant for DST
        # every active connection is in alive.csv exactly once, by its birth step
        alive = [r for r in read_rows(tmp_path / "alive.csv") if r["layer"] == w.name]
        assert sum(int(r["count"]) for r in alive) == w.n_active
        # drops seen in lifetimes.csv are the drops of dynamics.csv
        died = [r for r in read_rows(tmp_path / "lifetimes.csv") if r["layer"] == w.name]
        assert sum(int(r["count"]) for r in died) == sum(int(r["n_dropped"]) for r in mine)
    snaps = np.load(tmp_path / "first_layer.npz")
    assert list(snaps["steps"]) == [0, 10, 20, 30, 40, 50, 60]
    assert snaps["counts"].shape == (7, 12)
    assert (snaps["counts"].sum(1) == sparsifier.weights[0].n_active).all()
    _, s = survival_curve(load_run(tmp_path), "grown")
    assert s[0] == 1.0 and (np.diff(s) <= 0).all() and s[-1] >= 0


def test_recorder_every_second_update_merges_rows(tmp_path):
    recorder = MaskRecorder(tmp_path, every=2, snapshot_every=0)
    _, sparsifier = train_tiny(recorder)
    rows = [r for r in read_rows(tmp_path / "dynamics.csv") if r["step"] != "0"]
    assert len(rows) == sparsifier.update_count // 2 * len(sparsifier.weights)
    assert {r["updates"] for r in rows} == {"2"}
    assert not (tmp_path / "first_layer.npz").exists()


def test_recorder_thins_a_schedule_that_updates_every_step(tmp_path, monkeypatch):
    """SR-STE refreshes its masks after every step: with more updates than MAX_RECORDS the
    automatic ``every`` records every ceil(n / MAX_RECORDS)-th one (here 60 updates, at
    most 25 records: every 3rd); a schedule with fewer keeps every update."""
    from rigl.experiments.training import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "MAX_RECORDS", 25)
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = rigl.create("srste", model, optimizer, sparsity=0.8, total_steps=60)
    recorder = MaskRecorder(tmp_path / "srste", snapshot_every=0, sparsifier=sparsifier)
    assert recorder.every == 3
    for step in range(60):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        F.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
        sparsifier.step()
        recorder(step + 1, model, sparsifier, {"kind": "step"})
    assert sparsifier.update_count == 60
    rows = [r for r in read_rows(tmp_path / "srste" / "dynamics.csv") if r["step"] != "0"]
    assert len(rows) == 20 * len(sparsifier.weights) and {r["updates"] for r in rows} == {"3"}
    rigl_run = MaskRecorder(tmp_path / "rigl", snapshot_every=0)
    train_tiny(rigl_run)  # 11 updates in 60 steps: every one recorded
    assert rigl_run.every == 1


def test_recorder_state_dict_round_trip(tmp_path):
    recorder = MaskRecorder(tmp_path / "a", snapshot_every=10)
    train_tiny(recorder, steps=30)
    buffer = io.BytesIO()
    torch.save(recorder.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data only
    rows = state["rows"]["dynamics"]
    with open(tmp_path / "a" / "dynamics.csv", "a") as handle:
        handle.write("999,written,after,the,checkpoint,,,,,,,\n")
    restored = MaskRecorder(tmp_path / "a", snapshot_every=10)
    restored.load_state_dict(state)
    assert len(read_rows(tmp_path / "a" / "dynamics.csv")) == rows
    assert restored.state_dict()["snap_steps"] == [0, 10, 20, 30]


def test_interpolate_state_ends_and_midpoint():
    a = {"w": torch.zeros(3), "n": torch.tensor(1)}
    b = {"w": torch.tensor([2.0, 4.0, 6.0]), "n": torch.tensor(7)}
    assert torch.equal(interpolate_state(a, b, 0.0)["w"], a["w"])
    assert torch.equal(interpolate_state(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate_state(a, b, -0.5)["w"], torch.tensor([-1.0, -2.0, -3.0]))
    assert int(interpolate_state(a, b, 0.5)["n"]) == 7  # integer buffers are not mixed
    with pytest.raises(ValueError, match="differ in keys"):
        interpolate_state(a, {"w": b["w"]}, 0.5)


def test_survival_curve_kaplan_meier(tmp_path):
    run = RunData(path=tmp_path)
    # 4 connections grown: 2 die at age 10, 1 at age 20, 1 still alive at age 20
    run.lifetimes = [
        {"step": "10", "layer": "a", "origin": "grown", "lifetime": "10", "count": "2"},
        {"step": "30", "layer": "a", "origin": "grown", "lifetime": "20", "count": "1"},
    ]
    run.alive = [{"step": "30", "layer": "a", "origin": "grown", "birth_step": "10", "count": "1"}]
    x, s = survival_curve(run, "grown")
    assert list(x) == [0, 10, 20, 20] and np.allclose(s, [1, 0.5, 0.25, 0.25])


def test_first_layer_figure_draws_square_inputs_as_images(tmp_path):
    run = RunData(path=tmp_path, config={"method": "rigl", "distribution": "erk", "sparsity": 0.9})
    counts = np.random.default_rng(0).integers(0, 5, size=(3, 784)).astype(np.int32)
    run.first_layer = {"steps": np.array([0, 50, 100]), "counts": counts}
    assert first_layer_figure([run], tmp_path / "f.png")
    assert matplotlib.image.imread(tmp_path / "f.png").ndim == 3


def tiny_config(tmp_path, **changes):
    from rigl.experiments.config import from_dict

    base = {
        "dataset": "mnist1d",
        "data_root": str(tmp_path),
        "dataset_options": {"num_samples": 200},
        "model": "mlp",
        "model_options": {"hidden_sizes": [32, 16]},
        "sparsity": 0.8,
        "batch_size": 32,
        "epochs": 4,
        "update_interval": 4,
        "log_every": 2,
        "recorders": ["topology", "dynamics"],
        "tensorboard": False,
    }
    return from_dict({**base, **changes})


def test_killed_and_resumed_run_records_the_same_dynamics(tmp_path):
    from rigl.experiments.training.train import train

    class Killed(Exception):
        pass

    def kill_at_step_13(step, model, sparsifier, metrics):
        if step == 13:
            raise Killed

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_config(tmp_path, out=str(whole), checkpoint_every=5), quiet=True)
    with pytest.raises(Killed):
        config = tiny_config(tmp_path, out=str(resumed), checkpoint_every=5)
        train(config, quiet=True, callbacks=[kill_at_step_13])
    train(tiny_config(tmp_path, out=str(resumed), checkpoint_every=5), quiet=True, resume=True)
    for name in ("dynamics.csv", "lifetimes.csv", "alive.csv"):
        text = [(run / name).read_text().replace("\r", "") for run in (whole, resumed)]
        assert text[0] == text[1], name
    a, b = np.load(whole / "first_layer.npz"), np.load(resumed / "first_layer.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_resume_from_a_checkpoint_just_before_an_update_records_that_update(tmp_path):
    """checkpoint_every = update_interval = 10, killed after the 4th checkpoint (step 40,
    mid-epoch): the resumed run's first step is the update of step 40. The recorder used
    to attach its update hook after that step, so the update was missed (merged into the
    next one's row, or lost when it was the last)."""
    from rigl.experiments.training.train import train

    class Killed(Exception):
        pass

    def kill_after_step_41(step, model, sparsifier, metrics):
        if step == 41:  # after the checkpoint of step 40 and the update during step 41
            raise Killed

    changes = {"checkpoint_every": 10, "update_interval": 10, "batch_size": 24, "epochs": 8}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(tiny_config(tmp_path, out=str(whole), **changes), quiet=True)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path, out=str(resumed), **changes), quiet=True,
              callbacks=[kill_after_step_41])  # fmt: skip
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 40 and state["batch"] % 7  # 7 batches per epoch: mid-epoch
    train(tiny_config(tmp_path, out=str(resumed), **changes), quiet=True, resume=True)
    steps = {r["step"] for r in read_rows(whole / "dynamics.csv")}
    assert {"10", "20", "30", "40"} <= steps
    for name in ("dynamics.csv", "lifetimes.csv", "alive.csv", "topology.csv"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


def test_report_from_tiny_runs(tmp_path):
    from rigl.experiments.training.train import train

    runs = []
    for method in ("static", "rigl"):
        out = tmp_path / method
        train(tiny_config(tmp_path, method=method, out=str(out)), quiet=True)
        runs.append(str(out))
    report = tmp_path / "report"
    assert main(["report", *runs, "--out", str(report), "--points", "5"]) == 0
    page = (report / "index.html").read_text(encoding="utf-8")
    for name in FIGURES:
        image = matplotlib.image.imread(report / name)  # a valid PNG
        assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
        assert f'src="{name}"' in page
    assert not re.search(r"<(script|link)\b", page)  # self-contained: no external CSS/JS
    assert len(read_rows(report / "interpolation.csv")) == 5 * 2


def test_report_refuses_a_folder_it_did_not_write_and_a_folder_that_is_not_a_run(tmp_path, capsys):
    from rigl.experiments.training.train import train

    run = tmp_path / "static"
    train(tiny_config(tmp_path, method="static", out=str(run)), quiet=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>my page</h1>\n")
    assert main(["report", str(run), "--out", str(site), "--no-interpolation"]) == 2
    assert "was not written by rigl report" in capsys.readouterr().err
    assert (site / "index.html").read_text() == "<h1>my page</h1>\n"
    report = tmp_path / "report"
    for _ in range(2):  # its own folder: written again
        assert main(["report", str(run), "--out", str(report), "--no-interpolation"]) == 0
    (report / ".rigl-report.json").unlink()  # written before the marker existed: ours too
    assert main(["report", str(run), "--out", str(report), "--no-interpolation"]) == 0
    other = tmp_path / "notrun"
    other.mkdir()
    (other / "x").write_text("hi\n")
    capsys.readouterr()
    assert main(["report", str(other), "--out", str(tmp_path / "r2")]) == 2
    assert "is not a rigl run folder" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
