"""`rigl train` with ``parallel: fsdp`` under torchrun: two gloo processes, the model
sharded with FSDP2, killed after a checkpoint and resumed from its DCP folder, end with
the masks of one process (bitwise) and its weights (to float rounding)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from rigl.cli import main
from rigl.experiments.runio import read_csv

pytestmark = pytest.mark.filterwarnings("ignore:no topology update will happen")

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
TORCHRUN += ["--standalone", "-m", "rigl.cli"]


def torchrun(*args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([*TORCHRUN, *args], env=env, capture_output=True, text=True, timeout=240)


def full_state(run: Path) -> dict:
    """The final checkpoint, its DCP folder (if sharded) read as one plain state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    if "sharded" in state:
        dcp_to_torch_save(run / state["sharded"], run / "full.pt")
        state |= torch.load(run / "full.pt", weights_only=False)
    return state


def test_torchrun_fsdp_resumes_and_matches_one_process(tmp_path, one_thread):
    from rigl.experiments.data.datasets import load_dataset

    data_root = tmp_path / "data"
    load_dataset("mnist1d", root=data_root, num_samples=300)  # the cache, before two processes
    single = tiny_run_config(tmp_path / "one", data_root, lr=0.3, tensorboard=False)
    assert main(["train", "--config", str(single), "--quiet"]) == 0
    config = tiny_run_config(
        tmp_path / "two", data_root, lr=0.3, tensorboard=False, parallel="fsdp"
    )
    args = ["train", "--config", str(config), "--check_consistency_every", "1"]
    killed = torchrun(*args, RIGL_TEST_KILL_AT="checkpoint:2")  # after step 14's checkpoint
    assert killed.returncode != 0
    two = tmp_path / "two" / "run"
    assert torch.load(two / "checkpoint.pt", weights_only=True)["step"] == 14
    assert [p.name for p in (two / "checkpoint.dcp").iterdir()] == ["step-000000014"]
    done = torchrun(*args, "--resume")
    assert done.returncode == 0, done.stderr
    one, theirs = full_state(tmp_path / "one" / "run"), full_state(two)
    assert theirs["step"] == one["step"] == 30
    assert theirs["sparsifier"]["update_count"] == one["sparsifier"]["update_count"] == 5
    for name, mask in one["sparsifier"]["masks"].items():
        assert torch.equal(theirs["sparsifier"]["masks"][name], mask), name
    for name, tensor in one["model"].items():
        torch.testing.assert_close(theirs["model"][name], tensor, rtol=1e-5, atol=1e-6)
    assert (two / "topology.csv").read_text() == (
        tmp_path / "one" / "run" / "topology.csv"
    ).read_text()
    rows = [read_csv(run / "metrics.csv") for run in (tmp_path / "one" / "run", two)]
    for theirs_row, mine in zip(rows[0], rows[1], strict=True):
        if theirs_row["test_accuracy"]:
            assert float(mine["test_accuracy"]) == float(theirs_row["test_accuracy"])


def test_fsdp_config_refuses_what_it_cannot_shard(tmp_path, capsys):
    config = tiny_run_config(tmp_path, tmp_path / "data", parallel="fsdp", method="snfs")
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method 'snfs' is not supported on a model sharded with fully_shard" in err
    config = tiny_run_config(tmp_path, tmp_path / "data", parallel="fsdp", backend="sparse")
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    assert "backend='sparse' is not supported on a model sharded" in capsys.readouterr().err
    config = tiny_run_config(tmp_path, tmp_path / "data", parallel="fsdp", recorders=["dynamics"])
    assert main(["train", "--config", str(config), "--quiet"]) == 2
    assert "recorders ['dynamics'] read whole masks on rank 0" in capsys.readouterr().err
