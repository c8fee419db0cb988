"""The run folder of `rigl train`: whose it is, who is using it, what may be deleted.

* **Marker.** A folder becomes a run folder when ``rigl train`` marks it with
  ``.rigl-run.json``, written before any other file of the run and listing the files the
  run writes (:func:`run_files`). Only a new or empty folder is marked: a non-empty folder
  without the marker is refused, and nothing in it is written or deleted.
* **Deletion.** ``--overwrite``, and a ``--resume`` of a run killed before its first
  checkpoint (even before its ``config.yaml``), delete only the files that the marker
  lists, and the temporary files ``.NAME.*.tmp`` of those names that a kill inside an
  atomic write leaves (these are also deleted at every start). A listed folder (``tb``)
  loses only the files rigl writes there (TensorBoard event files). Anything else in the
  folder (notes, data) stays, and the folder itself is never removed. A marked folder in
  which no run trained (it failed on a setting or a missing data file before its first
  step) is started again without ``--overwrite``.
* **Lock.** One process at a time: the process using a run folder holds an advisory
  lock (``flock``) on ``.rigl-run.lock`` and writes its pid there; a second process is
  refused with "run folder X is in use by pid N". The kernel drops the lock of a process
  that dies, even by ``kill -9``, so a lock left behind by a killed run (a stale lock) is
  simply taken over.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from pathlib import Path
from typing import Any

from rigl.config import ConfigError
from rigl.experiments.config import ExperimentConfig, load_config
from rigl.experiments.runio import kill_point, read_json, write_json

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to the pid in the lock file
    fcntl = None

MARKER = ".rigl-run.json"
LOCK = ".rigl-run.lock"
CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
# written by every run; the two that make a run resumable or finished come first, so a
# kill while clearing a folder never leaves them beside a deleted config.yaml
RUN_FILES = (FINAL, CHECKPOINT, "config.yaml", "run.json", "metrics.csv")
# config keys that do not change what a run computes (tensorboard: runs saved before it
# became true / false / null hold `true`)
RESUMABLE_CHANGES = ("out", "device", "check_consistency_every", "tensorboard")


def run_files(config: ExperimentConfig) -> list[str]:
    """The files (and folders) a run of ``config`` writes in its run folder."""
    from rigl.experiments.training.callbacks import TensorBoardLog, recorder_outputs

    files = [*RUN_FILES, *recorder_outputs(config.recorders)]
    writes_tb = config.tensorboard is True or (
        config.tensorboard is None and TensorBoardLog.writer_class(required=False) is not None
    )  # null: only where the package is installed
    return files + (["tb"] if writes_tb else [])


class RunFolder:
    """A run folder whose lock this process holds until :meth:`release` (or process exit)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = -1

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def open_run(config: ExperimentConfig, *, resume: bool, overwrite: bool) -> RunFolder:
    """Lock and prepare ``config.out`` for the run; returns it locked.

    A new or empty folder is marked. A marked folder: with ``resume``, a started run
    (checkpoint or ``final.json``) is continued after checking its config, and one killed
    before its first checkpoint is cleared and started again; with ``overwrite``, it is
    cleared; otherwise it is refused. Anything else is refused before any file is written.
    """
    out = Path(config.out)
    _make_folder(out)
    _refuse_if_foreign(out)
    folder = lock(out)
    try:
        marker = read_marker(out)
        if marker is None:
            _refuse_if_foreign(out)  # again, under the lock
            _mark(out, config)
            return folder
        remove_temp_files(out, marker)
        if resume:
            if (out / "config.yaml").exists():
                check_same_config(config, out / "config.yaml")
            if (out / CHECKPOINT).exists() or (out / FINAL).exists():
                return folder  # continue (or report) the run
        elif not overwrite and _started(out):
            raise ConfigError(
                f"out={str(out)!r} already holds a run; pass --resume to continue it or "
                "--overwrite to start it again"
            )
        clear(out, marker)  # --overwrite, or killed before its first checkpoint
        _mark(out, config)
        return folder
    except OSError as exc:
        folder.release()
        raise _not_writable(out, exc) from exc
    except BaseException:
        folder.release()
        raise


def _started(out: Path) -> bool:
    """Whether the marked folder holds a run that trained: a run that failed before its
    first step (a setting the pattern cannot hold, a missing data file) leaves only the
    marker, and the corrected command may start there without --overwrite."""
    return any((out / name).exists() for name in (CHECKPOINT, FINAL, "metrics.csv"))


def check_same_config(config: ExperimentConfig, saved: Path) -> None:
    """Refuse to resume the run saved at ``saved`` (its ``config.yaml``) with other settings."""
    changed = config_changes(load_config(saved).to_dict(), config)
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the run's {str(saved)!r} in {changed}; "
            "resume with the same settings or start a new run folder"
        )


def config_changes(before: dict[str, Any], config: ExperimentConfig) -> list[str]:
    """Keys whose value in ``config`` differs from the mapping ``before``, ignoring those a
    resume may change (and keys ``before`` lacks: settings added since it was saved)."""
    return sorted(
        k
        for k, v in config.to_dict().items()
        if k not in RESUMABLE_CHANGES and k in before and before[k] != v
    )


# -- the marker and what it allows to delete -----------------------------------------------
def read_marker(out: Path) -> dict[str, Any] | None:
    path = out / MARKER
    if not path.exists():
        return None
    try:
        marker = read_json(path)
        if not all(map(_plain_name, marker["files"])):
            raise ValueError("names of files in the folder expected")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{str(path)!r} is damaged ({exc}); nothing in {str(out)!r} was changed. Move "
            "what you want to keep elsewhere and use a new folder for --out"
        ) from exc
    return marker


def _plain_name(name: Any) -> bool:
    """A name of an entry of the folder itself (never the folder, its parent, or deeper)."""
    separators = {"/", os.sep, os.altsep or "/"}
    plain = isinstance(name, str) and name not in ("", ".", "..", LOCK, MARKER)
    return plain and not any(sep in name for sep in separators)


def _mark(out: Path, config: ExperimentConfig) -> None:
    import rigl

    note = "written by rigl train: --overwrite may delete the files listed here, no others"
    write_json(out / MARKER, {"rigl": rigl.__version__, "note": note, "files": run_files(config)})
    kill_point("run-folder")


def clear(out: Path, marker: dict[str, Any]) -> None:
    """Delete the files ``marker`` lists (and their temporary files): only what rigl wrote."""
    for name in marker["files"]:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            _clear_folder(path)
        else:
            path.unlink(missing_ok=True)
    remove_temp_files(out, marker)


def _clear_folder(path: Path) -> None:
    """A folder rigl writes into (``tb``): only the files rigl writes there (TensorBoard
    event files) are deleted, then the folders left empty; anything else a user put there
    stays, and so does the folder holding it."""
    for file in path.rglob("events.out.tfevents.*"):
        if file.is_file() and not file.is_symlink():
            file.unlink()
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):  # not empty: kept
            folder.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def remove_temp_files(out: Path, marker: dict[str, Any]) -> None:
    """Delete ``.NAME.*.tmp``, the temporary files of our atomic writes that a kill left."""
    for name in [*marker["files"], MARKER]:
        for path in out.glob(f".{glob.escape(name)}.*.tmp"):
            path.unlink(missing_ok=True)


def _is_ours_unmarked(name: str) -> bool:
    """Entries a folder may hold before it is marked: the lock, a kill's marker temp file."""
    return name == LOCK or (name.startswith(f".{MARKER}.") and name.endswith(".tmp"))


def _refuse_if_foreign(out: Path) -> None:
    """Refuse a non-empty folder that rigl did not mark: it is somebody else's."""
    if (out / MARKER).exists():
        return
    others = sorted(p.name for p in out.iterdir() if not _is_ours_unmarked(p.name))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(
            f"out={str(out)!r} is not empty ({shown}) and is not a rigl run folder (no "
            f"{MARKER}); nothing in it was changed. Give a new or empty folder for --out"
        )


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"out={str(out)!r} is a file, not a folder; give a folder for the run's files "
            "(a new or empty one, or a run folder to --resume)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise _not_writable(out, PermissionError(errno.EACCES, "Permission denied"))


def _not_writable(out: Path, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    return ConfigError(
        f"out={str(out)!r}: cannot write the run folder ({reason}); choose a folder you can "
        "write to, or change its permissions"
    )


# -- the lock ----------------------------------------------------------------------------------
def lock(out: Path) -> RunFolder:
    """Hold ``out``'s lock, or raise ConfigError naming the pid that holds it."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _not_writable(out, exc) from exc
    try:
        holder = _take(fd)
    except BaseException:
        os.close(fd)
        raise
    if holder is not None:
        os.close(fd)
        raise ConfigError(
            f"run folder {str(out)!r} is in use by pid {holder}: another rigl process is "
            "training this run; wait for it to finish or stop it, then try again"
        )
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunFolder(out, fd)


def _take(fd: int) -> int | str | None:
    """Lock ``fd``; None when taken, else the pid written by the holder."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _pid_in(fd) or "unknown"
    pid = _pid_in(fd)  # no flock: trust a live pid (a dead one is a stale lock)
    return pid if pid and pid != os.getpid() and _alive(pid) else None


def _pid_in(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
