"""Run folders: rigl deletes only what it wrote, one process at a time, half-made runs
restart, and bad folders or checkpoints get a one-line error (issue 12, items 1-3, 15).

CLI behaviour is checked through a subprocess (``python -m rigl.cli``): exit code 2, the
message, and no traceback."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from rigl.cli import main
from rigl.experiments.runio import KILL_AT, read_csv
from rigl.experiments.training.folder import LOCK, MARKER

pytestmark = pytest.mark.filterwarnings("ignore:no topology update will happen")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def rigl(
    *args: str, cwd: Path | None = None, kill: str | None = None, **popen
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(KILL_AT, None)
    if kill:
        env[KILL_AT] = kill
    command = [sys.executable, "-m", "rigl.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, **popen)


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert message in result.stderr, output
    assert "Traceback" not in output
    assert len(result.stderr.strip().splitlines()) == 1, output  # one line


def killed_run(folder: Path, data_root: Path, step: int = 8, **changes) -> Path:
    """The config of a run killed right after step ``step`` (checkpoint at step 7)."""

    class Killed(Exception):
        pass

    def kill(s, model, sparsifier, metrics):
        if s == step:
            raise Killed

    from rigl.experiments.config import load_config
    from rigl.experiments.training.train import train

    config = tiny_run_config(folder, data_root, **changes)
    with pytest.raises(Killed):
        train(load_config(config), quiet=True, callbacks=[kill])
    return config


# -- 1. only what rigl wrote is deleted ------------------------------------------------------
def test_overwrite_refuses_a_folder_that_rigl_did_not_make(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    (project / "config.yaml").write_text("x: 1\n")
    (project / "data" / "dataset.csv").write_text("precious\n")
    result = rigl("train", "--config", str(config), "--out", str(project), "--overwrite")
    assert_refused(result, f"out={str(project)!r} is not empty (config.yaml, data)")
    assert "is not a rigl run folder" in result.stderr
    assert (project / "data" / "dataset.csv").read_text() == "precious\n"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "data"]


def test_resume_into_the_working_folder_deletes_nothing(tmp_path, data_root):
    """`cd proj && rigl train --config config.yaml --out . --resume` used to delete the
    user's files (the folder had a matching config.yaml and no checkpoint), then crash."""
    project = tmp_path / "proj"
    tiny_run_config(project, data_root)
    (project / "notes.txt").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    result = rigl("train", "--config", "config.yaml", "--out", ".", "--resume", cwd=project)
    assert_refused(result, "out='.' is not empty (config.yaml, notes.txt)")
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before


def test_overwrite_deletes_the_runs_files_and_nothing_else(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root, recorders=["topology", "dynamics"])
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    marker = json.loads((run / MARKER).read_text())
    written = {p.name for p in run.iterdir()} - {MARKER, LOCK}
    assert written <= set(marker["files"])  # the marker lists every file the run wrote
    assert set(marker["files"]) - written <= {"tb"}  # tb/: when tensorboard is installed
    (run / "notes.txt").write_text("mine\n")
    (run / "data").mkdir()
    (run / "data" / "x.csv").write_text("1\n")
    (run / ".checkpoint.pt.k2j4.tmp").write_bytes(b"left by a kill")
    rows = len(read_csv(run / "metrics.csv"))
    assert main(["train", "--config", str(config), "--quiet", "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine\n" and (run / "data" / "x.csv").exists()
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert len(read_csv(run / "metrics.csv")) == rows  # started again, not appended to
    assert json.loads((run / MARKER).read_text()) == marker


def test_overwrite_keeps_a_users_files_in_tb_and_a_tb_rigl_never_wrote(tmp_path, data_root):
    """tb/ is listed by the marker (where tensorboard is installed, or tensorboard: true);
    --overwrite deletes only the event files in it, never a user's files there."""
    config = tiny_run_config(tmp_path, data_root)
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    run = tmp_path / "run"
    marker = json.loads((run / MARKER).read_text())
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "my_notes.txt").write_text("mine\n")
    (run / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"rigl's")
    assert main(["train", "--config", str(config), "--quiet", "--overwrite"]) == 0
    assert (run / "tb" / "my_notes.txt").read_text() == "mine\n"
    if "tb" in marker["files"]:  # the old event file was rigl's: deleted
        assert not (run / "tb" / "events.out.tfevents.1.host.1.0").exists()
    else:  # tensorboard missing: tb/ is not rigl's at all, nothing in it is touched
        assert (run / "tb" / "events.out.tfevents.1.host.1.0").exists()


def test_tb_is_listed_only_where_rigl_writes_it(tmp_path, monkeypatch):
    from rigl.experiments.config import load_config
    from rigl.experiments.training import callbacks
    from rigl.experiments.training.folder import run_files

    config = load_config(tiny_run_config(tmp_path, tmp_path))
    monkeypatch.setattr(callbacks.TensorBoardLog, "writer_class", staticmethod(lambda **k: None))
    assert "tb" not in run_files(config.replace(tensorboard=None))
    assert "tb" in run_files(config.replace(tensorboard=True))
    assert "tb" not in run_files(config.replace(tensorboard=False))


def test_a_run_that_failed_before_training_does_not_block_the_corrected_command(
    tmp_path, data_root
):
    """A setting the pattern cannot hold fails before the first step: the folder holds only
    the marker, so the corrected command starts there (it used to say 'already holds a
    run; pass --resume or --overwrite')."""
    config = tiny_run_config(tmp_path, data_root)
    bad = rigl("train", "--config", str(config), "--pattern", "2:4", "--sparsity", "0.9")
    assert bad.returncode == 2 and "2:4" in bad.stderr
    assert (tmp_path / "run" / MARKER).exists()
    assert main(["train", "--config", str(config), "--quiet", "--pattern", "2:4",
                 "--sparsity", "0.5"]) == 0  # fmt: skip
    assert (tmp_path / "run" / "final.json").exists()
    again = rigl("train", "--config", str(config), "--quiet")  # a run that trained: refused
    assert_refused(again, "already holds a run")


def test_resume_with_nothing_to_resume_says_so_and_starts(tmp_path, data_root, capsys):
    """A mistyped --out with --resume used to train a new run without a word."""
    config = tiny_run_config(tmp_path, data_root)
    typo = tmp_path / "runn"
    assert main(["train", "--config", str(config), "--resume", "--out", str(typo)]) == 0
    assert f"nothing to resume in {str(typo)!r}" in capsys.readouterr().err
    assert (typo / "final.json").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    result = rigl("train", "--config", str(config), "--resume", "--overwrite")
    assert_refused(result, "--resume continues the run in --out and --overwrite starts it again")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("files", [["."], ["../elsewhere"], "config.yaml"])
def test_a_damaged_marker_deletes_nothing(tmp_path, data_root, capsys, files):
    """A marker naming the folder itself, its parent, or not a list: refused, not obeyed."""
    config = tiny_run_config(tmp_path, data_root)
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"files": files}))
    (run / "notes.txt").write_text("mine\n")
    assert main(["train", "--config", str(config), "--quiet", "--overwrite"]) == 2
    assert f"{str(run / MARKER)!r} is damaged" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine\n" and (tmp_path / "config.yaml").exists()


# -- 2. one process per run folder -----------------------------------------------------------
def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path, data_root):
    config = killed_run(tmp_path, data_root)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from rigl.experiments.training.folder import lock; lock(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (run / "metrics.csv").read_bytes()
        result = rigl("train", "--config", str(config), "--resume", "--quiet")
        assert_refused(result, f"run folder {str(run)!r} is in use by pid {holder.pid}")
        assert (run / "metrics.csv").read_bytes() == metrics  # not touched
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK).read_text().strip() == str(holder.pid)  # a stale lock: its pid is dead
    assert main(["train", "--config", str(config), "--resume", "--quiet"]) == 0
    assert (run / "final.json").exists()


# -- 3. kills: a half-made run restarts, temporary files are cleaned up ----------------------
def test_a_run_killed_before_its_config_was_written_resumes(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    run = tmp_path / "run"
    killed = rigl("train", "--config", str(config), "--quiet", kill="run-built:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / MARKER).exists() and not (run / "config.yaml").exists()
    assert main(["train", "--config", str(config), "--quiet", "--resume"]) == 0
    assert (run / "final.json").exists()
    steps = [int(r["step"]) for r in read_csv(run / "metrics.csv") if r["kind"] == "step"]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_a_kill_inside_a_checkpoint_write_leaves_no_temporary_file(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    run = tmp_path / "run"
    killed = rigl("train", "--config", str(config), "--quiet", kill="write:checkpoint.pt:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (temp,) = run.glob(".checkpoint.pt.*.tmp")  # complete, never renamed
    assert torch.load(temp, weights_only=True)["step"] == 14
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 7
    assert main(["train", "--config", str(config), "--quiet", "--resume"]) == 0
    assert not list(run.glob(".*.tmp")) and (run / "final.json").exists()


# -- 15. clear errors ------------------------------------------------------------------------
def _other_run_checkpoint(tmp_path: Path, data_root: Path) -> bytes:
    other = tmp_path / "other"
    config = tiny_run_config(other, data_root, sparsity=0.5, epochs=1)
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    return (other / "run" / "checkpoint.pt").read_bytes()


@pytest.mark.parametrize(
    ("damage", "message", "how"),
    [
        ("truncated", "cannot be read", "subprocess"),
        ("empty", "cannot be read", "main"),
        ("garbage", "cannot be read", "main"),
        ("a pickle of objects", "cannot be read (not a file of plain tensors)", "main"),
        ("not a dict", "is not a rigl train checkpoint (it holds a list", "main"),
        ("another run's", "was trained with in ['epochs', 'sparsity']",
         "subprocess"),
    ],
)  # fmt: skip
def test_resume_from_a_bad_checkpoint_is_refused(tmp_path, data_root, capsys, damage, message, how):
    """A subprocess for two of them; the others through ``main`` (the same code, faster)."""
    config = killed_run(tmp_path, data_root)
    path = tmp_path / "run" / "checkpoint.pt"
    good = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"these are not the weights you are looking for\n" * 10)
    elif damage == "a pickle of objects":  # torch's error advises weights_only=False
        torch.save({"model": Path("not/a/tensor")}, path)
    elif damage == "not a dict":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(_other_run_checkpoint(tmp_path, data_root))
    logs = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix == ".csv"}
    args = ["train", "--config", str(config), "--resume", "--quiet"]
    if how == "subprocess":
        result = rigl(*args)
    else:
        capsys.readouterr()
        code = main(args)
        result = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_refused(result, message)
    assert f"{str(path)!r}" in result.stderr and "--overwrite" in result.stderr
    assert "weights_only" not in result.stderr  # torch's unsafe advice is not repeated
    assert {name: (tmp_path / "run" / name).read_bytes() for name in logs} == logs  # not cut


def test_out_naming_a_file_is_refused(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    (tmp_path / "results.txt").write_text("keep\n")
    result = rigl("train", "--config", str(config), "--out", str(tmp_path / "results.txt"))
    assert_refused(result, "is a file, not a folder")
    assert (tmp_path / "results.txt").read_text() == "keep\n"


def _without_permission_override() -> None:  # pragma: no cover - runs in the child
    """Root ignores permission bits: drop the capabilities that let it (before exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def test_a_read_only_output_folder_is_refused(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root)
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    as_user = {"preexec_fn": _without_permission_override} if os.geteuid() == 0 else {}
    probe = subprocess.run(
        ["sh", "-c", f"touch {folder}/probe"], capture_output=True, **as_user
    )  # fmt: skip
    if probe.returncode == 0:
        pytest.skip("cannot make a folder read-only for this user")
    result = rigl("train", "--config", str(config), "--out", str(folder), **as_user)
    assert_refused(result, f"out={str(folder)!r}: cannot write the run folder (Permission denied)")
    assert list(folder.iterdir()) == []


def test_a_failed_run_of_a_sweep_is_one_error_and_the_others_are_kept(tmp_path, data_root):
    config = tiny_run_config(tmp_path, data_root, epochs=1, checkpoint_every=0)
    from rigl.experiments.runio import claim_output_folder

    out = tmp_path / "sweep"
    claim_output_folder(out, "compare")  # a compare folder, with one run folder taken:
    blocked = out / "runs" / "rigl-erk-s0.8-1x-seed0"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("mine")  # not a rigl run folder: that run is refused
    args = ["compare", "--config", str(config), "--methods", "rigl", "--sparsities", "0.8"]
    result = rigl(*args, "--seeds", "1", "--jobs", "1", "--out", str(out), "--quiet")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert "error: 1 of 2 runs failed" in result.stderr, output
    assert "rigl-erk-s0.8-1x-seed0" in result.stderr and "not a rigl run folder" in result.stderr
    assert (blocked / "notes.txt").read_text() == "mine"
    assert (out / "runs" / "dense-1x-seed0" / "final.json").exists()  # the other run is kept
