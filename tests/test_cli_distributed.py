"""`rigl train` and `rigl compare` under torchrun: two gloo processes on the CPU train
what one process trains with the same global batch, and only rank 0 writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from rigl import distributed
from rigl.cli import build_parser, main
from rigl.config import ConfigError
from rigl.experiments.config import load_config
from rigl.experiments.runio import read_csv
from rigl.experiments.sweeps import compare
from rigl.experiments.training.folder import LOCK, MARKER
from rigl.experiments.training.ranks import check_data_parallel
from rigl.experiments.training.train import train

pytestmark = pytest.mark.filterwarnings("ignore:no topology update will happen")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
TORCHRUN += ["--standalone", "-m", "rigl.cli"]
RUN_FILES = {"config.yaml", "run.json", "metrics.csv", "topology.csv", "checkpoint.pt"}
RUN_FILES |= {MARKER, LOCK}  # the run folder's marker and lock (rigl.experiments.training.folder)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from rigl.experiments.data.datasets import load_dataset

    root = tmp_path_factory.mktemp("data")
    load_dataset("mnist1d", root=root, num_samples=300)  # the cache, before several processes
    return root


def tiny_config(folder: Path, data_root: Path, **changes) -> Path:
    """30 steps of RigL (5 topology updates) on 240 MNIST-1D examples, global batch 24."""
    return tiny_run_config(folder, data_root, lr=0.3, tensorboard=False, **changes)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=180)


def assert_same_model(a: Path, b: Path) -> None:
    """Checkpoints at the same step with identical masks and (to float rounding) weights."""
    one, two = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (a, b))
    assert one["step"] == two["step"] == 30
    assert one["sparsifier"]["update_count"] == two["sparsifier"]["update_count"] == 5
    for name, mask in one["sparsifier"]["masks"].items():
        assert torch.equal(mask, two["sparsifier"]["masks"][name]), name
    for name, tensor in one["model"].items():
        torch.testing.assert_close(two["model"][name], tensor, rtol=1e-5, atol=1e-6)
    assert (a / "topology.csv").read_text() == (b / "topology.csv").read_text()


CNN1D = {"model": "cnn1d", "model_options": {"channels": 8}}  # compressed Conv1d layers


@pytest.mark.parametrize(
    ("backend", "model"),
    [("masked", {}), ("sparse", {}), ("sparse", CNN1D)],
    ids=["masked", "sparse", "sparse-cnn1d"],
)
def test_torchrun_train_matches_one_process(tmp_path, data_root, one_thread, backend, model):
    """Two ranks, global batch 24 (12 each) == one process with batch 24: same masks at
    every update, same weights, same logged numbers; one set of files, written once. On
    the compressed backend the grow scores are all-reduced block by block (of a Linear's
    rows, of a convolution's output channels)."""
    single = tiny_config(tmp_path / "one", data_root, backend=backend, **model)
    assert main(["train", "--config", str(single), "--quiet"]) == 0
    config = tiny_config(tmp_path / "two", data_root, backend=backend, **model)
    done = torchrun("train", "--config", str(config), "--check_consistency_every", "1")
    assert done.returncode == 0, done.stderr
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    assert {p.name for p in (tmp_path / "two").iterdir()} == {"config.yaml", "run"}
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    assert {p.name for p in two.iterdir()} == RUN_FILES | {"final.json"}
    assert done.stderr.count("test accuracy") == 1  # the summary line, from rank 0 only
    assert_same_model(one, two)
    rows = {run: read_csv(run / "metrics.csv") for run in (one, two)}
    order = {run: [(r["kind"], r["step"]) for r in rows[run]] for run in (one, two)}
    assert order[two] == order[one]  # no row written twice
    for mine, theirs in zip(rows[two], rows[one], strict=True):  # global-batch numbers
        for key in ("loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
            if theirs[key]:
                assert float(mine[key]) == pytest.approx(float(theirs[key]), rel=1e-5), key
    finals = [json.loads((run / "final.json").read_text()) for run in (one, two)]
    assert finals[1]["test_accuracy"] == finals[0]["test_accuracy"]  # the full test set
    assert finals[1]["params"] == finals[0]["params"]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


@pytest.mark.slow  # another torchrun start (~7 s on 2 cores); run with -m slow
def test_torchrun_error_of_rank_0_is_raised_on_every_rank(tmp_path, data_root):
    """Rank 0 finds the run folder taken: every rank stops (no hang) with its
    ConfigError, printed once, and nothing is written."""
    config = tiny_config(tmp_path, data_root)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    done = torchrun("train", "--config", str(config), "--quiet")
    assert done.returncode != 0
    assert done.stderr.count("rigl train: error: out=") == 1, done.stderr
    assert "is not a rigl run folder" in done.stderr  # a config.yaml but no rigl marker
    assert "(rank 1)" not in done.stderr
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


def test_torchrun_compare_resumes_a_one_process_run(tmp_path, data_root, one_thread):
    """`rigl compare` under torchrun: the runs take turns on both ranks, a run left
    half-done by one process is resumed from its checkpoint by both ranks and ends where
    an uninterrupted one-process run ends; rank 0 writes the results."""
    base = tiny_config(tmp_path, data_root)
    out = tmp_path / "sweep"
    args = ["compare", "--config", str(base), "--methods", "rigl", "--sparsities", "0.8",
            "--seeds", "1", "--out", str(out), "--quiet"]  # fmt: skip
    plan = compare.plan_from_args(build_parser().parse_args(args))
    (spec,) = [s for s in plan.runs if s.method == "rigl"]
    config = spec.config(plan.base, out)

    def stop(step, model, sparsifier, metrics):  # after the checkpoint of step 14
        if step == 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, quiet=True, callbacks=[stop])
    assert torch.load(Path(config.out) / "checkpoint.pt", weights_only=True)["step"] == 14
    reference = config.replace(out=str(tmp_path / "reference"))
    train(reference, quiet=True)

    done = torchrun(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("| RigL |") == 1  # the table, printed by rank 0
    assert_same_model(Path(reference.out), Path(config.out))
    steps = [int(r["step"]) for r in read_csv(Path(config.out) / "metrics.csv") if r["step"]]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 3  # + 3 epoch rows
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["world_size"] == 2
    assert sorted(r["method"] for r in results["records"]) == ["dense", "rigl"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(s.name for s in plan.runs)


def test_data_parallel_config_errors(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "init_from_env", lambda **_: distributed.DistEnv(0, 2))
    config = tiny_config(tmp_path, data_root, batch_size=25)
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "batch_size=25 is the global batch and must be divisible by the world size" in err
    assert "(2 processes)" in err and "--batch_size 26" in err
    assert not (tmp_path / "run").exists()
    # a last partial batch with fewer examples than ranks
    four = distributed.DistEnv(rank=0, world_size=4)
    with pytest.raises(ConfigError, match="the last batch of each epoch has 2 of the 242"):
        check_data_parallel(load_config(config, {"batch_size": 24}), four, n_train=242)
    check_data_parallel(load_config(config, {"batch_size": 24}), four, n_train=240)


def test_crop_flip_of_shards_is_crop_flip_of_the_global_batch():
    """Each rank augments its shard with the draws of the whole batch: the shards
    together get one process's crops, and every rank's generator stays in step."""
    from rigl.experiments.training.builders import crop_flip

    x = torch.randn(6, 3, 8, 8)
    torch.manual_seed(5)
    whole = crop_flip(x)
    after = torch.get_rng_state()
    parts = []
    for rank in range(2):
        torch.manual_seed(5)
        rows = distributed.shard(torch.arange(6), distributed.DistEnv(rank, 2))
        parts.append(crop_flip(x[rows], offset=int(rows[0]), total=6))
        assert torch.equal(torch.get_rng_state(), after)
    assert torch.equal(torch.cat(parts), whole)
