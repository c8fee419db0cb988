"""kill -9 at any point, then resume: the same files as a run that was never killed.

``rigl train`` is killed (``RIGL_TEST_KILL_AT``: the process SIGKILLs itself at the N-th
pass of a named point) at seeded random points, including inside checkpoint writes and
between building the run and writing its config; each time it is resumed. The final run
folder must equal an uninterrupted run's, recorders included, with no temporary file left.
And killing ``rigl compare`` kills its workers, so a re-run trains each run once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import tiny_run_config
from kill_driver import KillDriver
from rigl.experiments.data.datasets import load_dataset
from rigl.experiments.runio import read_csv
from rigl.experiments.training.folder import LOCK

TIMING = {"elapsed_s", "wall_time_s", "cpu_time_s"}  # the only numbers a kill may change


def checkpoint_step(run: Path) -> int | None:
    path = run / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["step"]) if path.exists() else None


def next_kill(rng: random.Random, run: Path, total: int, every: int) -> str:
    """A kill point that the next resume of ``run`` is sure to reach, drawn from ``rng``;
    mostly early ones, so that the kills spread over the whole run."""
    step = checkpoint_step(run)
    done = step or 0
    checkpoints = len(range((done // every + 1) * every, total + 1, every)) + 1  # + finish
    nth = min(2, checkpoints)
    points = ["run-built:1", "write:run.json:1", "write:metrics.csv:1", "write:final.json:1",
              "write:dynamics.csv:1", f"checkpoint:{rng.randint(1, nth)}",
              f"write:checkpoint.pt:{rng.randint(1, nth)}"]  # fmt: skip
    if done < total:
        points += [f"step:{rng.randint(1, min(8, total - done))}"] * 3
    if step is None:  # the run starts (again) from nothing
        points += ["run-folder:1", "write:config.yaml:1", "write:.rigl-run.json:1"]
    return rng.choice(points)


def same(a: Any, b: Any) -> bool:
    """Equal to the last bit, timings (at any depth) aside."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        keys = a.keys() - TIMING
        return (
            isinstance(b, dict)
            and keys == b.keys() - TIMING
            and all(same(a[k], b[k]) for k in keys)
        )
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_same_run_folder(reference: Path, run: Path) -> None:
    names = {p.name for p in reference.iterdir()}
    assert {p.name for p in run.iterdir()} == names
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    for name in sorted(names - {LOCK}):
        a, b = reference / name, run / name
        if name == "metrics.csv":
            rows = [[{k: v for k, v in r.items() if k not in TIMING} for r in read_csv(p)]
                    for p in (a, b)]  # fmt: skip
            assert rows[0] == rows[1], name
        elif name in ("final.json", "run.json"):
            drop = TIMING | {"resumed"}
            data = [{k: v for k, v in json.loads(p.read_text()).items() if k not in drop}
                    for p in (a, b)]  # fmt: skip
            assert data[0] == data[1], name
        elif name == "checkpoint.pt":
            assert same(*[torch.load(p, weights_only=True) for p in (a, b)]), name
        elif name.endswith(".npz"):  # zip entries carry a time stamp: compare the arrays
            x, y = np.load(a), np.load(b)
            assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files), name
        else:
            assert a.read_bytes() == b.read_bytes(), name


def test_kill_at_random_points_then_resume_gives_the_same_files(tmp_path):
    """14 kills of one run (10 drawn with a fixed seed), each followed by a resume."""
    changes = {"epochs": 4, "update_interval": 5, "checkpoint_every": 7, "tensorboard": False,
               "recorders": ["topology", "dynamics"]}  # fmt: skip
    config = tiny_run_config(tmp_path, tmp_path / "data", **changes)
    (tmp_path / "data").mkdir()
    load_dataset("mnist1d", root=tmp_path / "data", num_samples=300)  # the cache, once
    run, reference = tmp_path / "run", tmp_path / "reference"
    train = ["train", "--config", str(config), "--quiet", "--resume"]  # as rigl compare does
    total, every, rng = 40, 7, random.Random(12)
    # first: after building the run, before (and inside) writing config.yaml, inside a
    # checkpoint write; then 10 drawn; last: inside the write of final.json
    kills = ["run-built:1", "write:config.yaml:1", "write:checkpoint.pt:2"]
    with KillDriver(tmp_path / "driver.log") as driver:
        assert driver.run(train) == 0, (tmp_path / "driver.log").read_text()
        run.rename(reference)
        for i in range(14):
            if i >= len(kills):
                kills.append(next_kill(rng, run, total, every) if i < 13 else "write:final.json:1")
            code = driver.run(train, kill=kills[i])
            assert code == -signal.SIGKILL, f"kill {i + 1} at {kills[i]} not reached ({code})"
        assert driver.run(train) == 0, (tmp_path / "driver.log").read_text()
    assert len(set(kills)) >= 6, kills  # a varied set of points
    assert_same_run_folder(reference, run)


# -- rigl compare ------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_compare_kills_its_workers_and_a_rerun_trains_each_run_once(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    load_dataset("mnist1d", root=data, num_samples=300)
    # long enough that neither run can finish between its first checkpoint and the kill
    base = tiny_run_config(tmp_path, data, epochs=300, checkpoint_every=10, log_every=10)
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "rigl.cli", "compare", "--config", str(base), "--methods",
            "rigl", "--sparsities", "0.8", "--seeds", "1", "--jobs", "2", "--out", str(out),
            "--quiet"]  # fmt: skip
    runs = [out / "runs" / name for name in ("dense-1x-seed0", "rigl-erk-s0.8-1x-seed0")]
    parent = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not all((r / "checkpoint.pt").exists() for r in runs):  # both workers training
        assert parent.poll() is None and time.monotonic() < deadline, "no checkpoints"
        time.sleep(0.05)
    workers = [int((r / LOCK).read_text()) for r in runs]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), "pool workers outlived the killed compare"
    assert all(not (r / "final.json").exists() for r in runs), "finished before the kill"
    subprocess.run(args, env=env, check=True)
    for run in runs:
        rows = read_csv(run / "metrics.csv")
        steps = [int(r["step"]) for r in rows if r["kind"] == "step"]
        assert steps == list(range(10, 3001, 10)), run.name  # once each, in order
        assert [int(r["epoch"]) for r in rows if r["kind"] == "epoch"] == list(range(300))
