"""The `rigl` command end to end on tiny MNIST-1D runs: train, resume after kill -9,
compare, errors before training, flops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from rigl.cli import main
from rigl.experiments.data.datasets import load_dataset
from rigl.experiments.runio import read_csv

pytestmark = pytest.mark.filterwarnings("ignore:no topology update will happen")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A data folder shared by this module's tests (MNIST-1D is generated once into it)."""
    return tmp_path_factory.mktemp("data")


tiny_config = tiny_run_config


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


# -- rigl train ------------------------------------------------------------------------------
def test_train_writes_every_documented_file(tmp_path, data_root, monkeypatch, capsys):
    fake_tb = types.ModuleType("torch.utils.tensorboard")
    scalars = []

    class SummaryWriter:  # records what TensorBoard would get
        def __init__(self, log_dir):
            Path(log_dir).mkdir(parents=True)

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    fake_tb.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    config = tiny_config(tmp_path, data_root)
    assert main(["train", "--config", str(config), "--quiet", "--lr", "0.05"]) == 0
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "run.json", "metrics.csv", "topology.csv", "checkpoint.pt"} <= names
    assert {"final.json", "tb"} <= names
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.05  # flag won
    info = json.loads((run / "run.json").read_text())
    assert "--lr 0.05" in info["command"] and set(info["versions"]) >= {"torch", "rigl", "python"}
    assert "git" in info
    rows = read_csv(run / "metrics.csv")
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [int(r["step"]) for r in steps[:2]] == [5, 10] and steps[0]["drop_fraction"]
    assert len(epochs) == 3 and all(r["test_accuracy"] and r["train_loss"] for r in epochs)
    topology = read_csv(run / "topology.csv")
    assert topology and {r["step"] for r in topology} >= {"4", "8"}
    assert all(r["n_dropped"] == r["n_grown"] for r in topology)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "sparsifier", "step", "epoch", "data_order"} <= set(
        state
    )
    assert state["step"] == 30 and "torch_rng" in state
    result = final(run)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["params"] < result["params_dense"]
    assert 0 < result["inference_flops_ratio"] < 1 and 0 < result["train_flops_ratio"] < 1
    assert result["wall_time_s"] > 0 and result["total_steps"] == 30
    assert any(tag == "epoch/test_accuracy" for tag, _, _ in scalars)
    # a second run into the same folder is refused before training
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err


def test_callbacks_and_named_recorders_see_every_step(tmp_path, data_root):
    from rigl.experiments.config import load_config
    from rigl.experiments.training.train import train

    calls = []

    def callback(step, model, sparsifier, metrics):
        calls.append((step, metrics["kind"], sparsifier.step_count))

    path = tiny_config(tmp_path, data_root, recorders=["topology", "dynamics"], epochs=2)
    result = train(load_config(path), quiet=True, callbacks=[callback])
    assert [c for c in calls if c[1] == "step"] == [(s, "step", s) for s in range(1, 21)]
    assert [c for c in calls if c[1] == "epoch"] == [(10, "epoch", 10), (20, "epoch", 20)]
    assert (tmp_path / "run" / "dynamics.csv").exists() and result["total_steps"] == 20


def test_sparse_backend_trains_like_the_masked_one(tmp_path, data_root):
    """--backend sparse: SparseLinear layers, the same masks and the same final numbers."""
    runs = {}
    for backend in ("masked", "sparse"):
        (tmp_path / backend).mkdir()
        config = tiny_config(tmp_path / backend, data_root)
        assert main(["train", "--config", str(config), "--quiet", "--backend", backend]) == 0
        runs[backend] = tmp_path / backend / "run"
    masked, sparse = final(runs["masked"]), final(runs["sparse"])
    for key in ("test_accuracy", "params", "density", "inference_flops", "train_flops_ratio"):
        assert sparse[key] == pytest.approx(masked[key], rel=1e-5), key
    topology = [(runs[b] / "topology.csv").read_text() for b in ("masked", "sparse")]
    assert topology[0] == topology[1]  # identical masks at every update
    assert yaml.safe_load((runs["sparse"] / "config.yaml").read_text())["backend"] == "sparse"
    state = torch.load(runs["sparse"] / "checkpoint.pt", weights_only=True)
    assert any(key.endswith(".values") for key in state["model"])  # compressed layers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning_rate", "0.1"], "unrecognized arguments: --learning_rate"),
        (["--epochs", "two"], "epochs='two' has the wrong type"),
        (["--data_root", "/no/such/folder"], "data_root='/no/such/folder': no such folder"),
        (["--method", "magic"], "method='magic' is unknown"),
        (["--backend", "csr"], "backend='csr' is unknown"),
        (["--backend", "sparse", "--method", "snfs"], "backend='sparse' with method='snfs'"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, data_root, capsys, args, message):
    config = tiny_config(tmp_path, data_root)
    try:
        code = main(["train", "--config", str(config), "--quiet", *args])
    except SystemExit as exc:  # argparse rejects unknown flags itself
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_key_and_missing_dataset_files_fail_before_training(tmp_path, data_root, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: mnist1d\nlearning_rate: 0.1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'learning_rate'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny_config(tmp_path, empty, dataset="mnist", dataset_options={"download": False})
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_resume_after_kill_is_bit_identical(tmp_path, data_root):
    """kill -9 a run right after a mid-epoch checkpoint; --resume ends where an
    uninterrupted run ends, to the last bit."""
    changes = {"epochs": 40, "batch_size": 20, "checkpoint_every": 7, "log_every": 50}
    load_dataset("mnist1d", root=data_root, num_samples=300)  # the cache, before two processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "rigl.cli", "train", "--quiet"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir(), cut_dir.mkdir()
    ref_cfg = tiny_config(ref_dir, data_root, **changes)
    cut_cfg = tiny_config(cut_dir, data_root, **changes)
    reference = subprocess.Popen([*cmd, "--config", str(ref_cfg)], env=env)
    victim = subprocess.Popen([*cmd, "--config", str(cut_cfg)], env=env)
    checkpoint = cut_dir / "run" / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (cut_dir / "run" / "final.json").exists(), "the run finished before the kill"
    state = torch.load(checkpoint, weights_only=True)
    assert 0 < state["batch"] < 12, "the checkpoint should be mid-epoch (12 batches per epoch)"
    subprocess.run([*cmd, "--config", str(cut_cfg), "--resume"], env=env, check=True)
    assert reference.wait() == 0
    ref_state = torch.load(ref_dir / "run" / "checkpoint.pt", weights_only=True)
    cut_state = torch.load(checkpoint, weights_only=True)
    assert ref_state["step"] == cut_state["step"] == 480
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, cut_state["model"][name]), name
    for name, mask in ref_state["sparsifier"]["masks"].items():
        assert torch.equal(mask, cut_state["sparsifier"]["masks"][name]), name
    assert final(ref_dir / "run")["test_accuracy"] == final(cut_dir / "run")["test_accuracy"]
    info = json.loads((cut_dir / "run" / "run.json").read_text())
    assert len(info["resumed"]) == 1
    steps = [
        int(r["step"]) for r in read_csv(cut_dir / "run" / "metrics.csv") if r["kind"] == "step"
    ]
    assert steps == sorted(set(steps))  # rows written after the checkpoint were not repeated


# -- rigl compare ------------------------------------------------------------------------------
def test_compare_grid_writes_results_and_skips_finished_runs(tmp_path, data_root, capsys):
    base = tiny_config(tmp_path, data_root, epochs=2, checkpoint_every=0)
    out = tmp_path / "sweep"
    args = ["compare", "--config", str(base), "--methods", "static,rigl", "--sparsities",
            "0.8,0.9", "--seeds", "1", "--jobs", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "| Method | test acc. % at 80% | test acc. % at 90% |" in printed.out
    assert "| RigL |" in printed.out
    names = {p.name for p in out.iterdir()}
    assert {"results.json", "results.md", "accuracy_vs_sparsity.png"} <= names
    assert "accuracy_vs_train_flops.png" in names
    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    assert len(records) == 5  # dense once + 2 methods x 2 sparsities
    assert [r["method"] for r in records].count("dense") == 1
    for key in ("test_accuracy", "params", "inference_flops_ratio", "train_flops_ratio"):
        assert all(r[key] is not None for r in records), key
    finals = sorted(out.glob("runs/*/final.json"))
    stamps = [p.stat().st_mtime_ns for p in finals]
    assert main(args) == 0
    assert "5 runs, 5 already finished" in capsys.readouterr().err
    assert [p.stat().st_mtime_ns for p in finals] == stamps


def test_compare_refuses_a_folder_it_did_not_write_and_reuses_its_own(tmp_path, data_root, capsys):
    """A user's results.md / results.json in --out were overwritten; now refused before
    anything is written. A compare folder (its marker, or from before the marker: runs/
    with marked runs beside results files) is reused."""
    base = tiny_config(tmp_path, data_root, epochs=1, checkpoint_every=0)
    mine = tmp_path / "proj"
    mine.mkdir()
    (mine / "results.md").write_text("# my own results\n")
    (mine / "results.json").write_text('{"mine": 1}\n')
    args = ["compare", "--config", str(base), "--methods", "static", "--sparsities", "0.8",
            "--seeds", "1", "--jobs", "1", "--quiet"]  # fmt: skip
    assert main([*args, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "is not empty (results.json, results.md) and was not written by rigl compare" in err
    assert (mine / "results.md").read_text() == "# my own results\n"
    assert sorted(p.name for p in mine.iterdir()) == ["results.json", "results.md"]
    out = tmp_path / "sweep"
    assert main([*args, "--out", str(out)]) == 0
    assert (out / ".rigl-compare.json").exists()
    (out / ".rigl-compare.json").unlink()  # a folder written before the marker existed
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "notes.txt").write_text("x\n")  # beside an unmarked compare folder: not sure
    (out / ".rigl-compare.json").unlink()
    assert main([*args, "--out", str(out)]) == 2


# -- rigl flops ------------------------------------------------------------------------------
def test_flops_json(capsys):
    pytest.importorskip("rigl.experiments.flops_cli")
    assert main(["flops", "--model", "lenet300_100", "--sparsity", "0.9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert isinstance(report, dict) and report


def test_csv_log_uses_one_line_ending_across_truncation(tmp_path):
    from rigl.experiments.runio import CsvLog, read_csv

    log = CsvLog(tmp_path / "m.csv", ["step", "loss"])
    for step in range(3):
        log.append({"step": step, "loss": 0.5})
    log.truncate(2)  # what a resume does
    log.append({"step": 2, "loss": "a,b"})  # a quoted cell
    data = (tmp_path / "m.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == 4
    assert [r["step"] for r in read_csv(tmp_path / "m.csv")] == ["0", "1", "2"]


def _find_masks(state):
    """The sparsifier's masks in a run checkpoint, wherever they are nested."""
    if isinstance(state, dict):
        if "masks" in state and "method" in state:
            return state["masks"]
        for value in state.values():
            found = _find_masks(value)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize(
    ("flags", "yaml_key"),
    [(["--pattern", "2:4", "--sparsity", "0.5"], {}), ([], {"pattern": "fanin"})],
)
def test_train_with_a_pattern_from_the_flag_or_the_yaml(tmp_path, data_root, flags, yaml_key):
    config = tiny_config(tmp_path, data_root, epochs=1, **yaml_key)
    assert main(["train", "--config", str(config), "--quiet", *flags]) == 0
    masks = _find_masks(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True))
    assert masks
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        if flags:  # 2 of every 4 consecutive inputs
            assert bool((rows.reshape(-1, 4).sum(1) == 2).all()), name
        elif not bool(rows.all()):  # the same fan-in in every row
            assert rows.sum(1).unique().numel() == 1, name
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["pattern"] in (
        "2:4",
        "fanin",
    )


def test_a_bad_pattern_is_a_one_line_error(tmp_path, data_root):
    config = tiny_config(tmp_path, data_root)
    result = subprocess.run(
        [sys.executable, "-m", "rigl.cli", "train", "--config", str(config), "--pattern", "3:2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )  # fmt: skip
    assert result.returncode != 0
    assert "0 < N < M" in result.stderr and "Traceback" not in result.stderr
