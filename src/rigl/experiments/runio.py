"""Run-folder I/O: atomic writes, provenance (git hash, versions, command line), CSV logs.

Every file a run writes goes through a temporary file ``.NAME.*.tmp`` in the same folder
followed by ``os.replace``, so a run killed at any moment leaves either the old or the new
file, never half of one (the next start of the run deletes such leftover temporary files,
see :mod:`rigl.experiments.training.folder`).

Testing hook: :func:`kill_point` lets fault-injection tests SIGKILL a run at named points.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

import rigl

_UMASK = os.umask(0)
os.umask(_UMASK)

KILL_AT = "RIGL_TEST_KILL_AT"
_passed: dict[str, int] = {}  # kill point -> times this process passed it


def kill_point(name: str) -> None:
    """Testing hook (fault injection): with ``RIGL_TEST_KILL_AT=NAME:N`` in the environment
    the process SIGKILLs itself the N-th time it passes point ``NAME``, with no cleanup, as
    ``kill -9`` would. Points: ``run-folder`` (run folder marked, nothing else written),
    ``run-built`` (run built, ``config.yaml`` not yet written), ``write:FILE`` (inside an
    atomic write of FILE: the temporary file is complete, not yet renamed), ``step`` (a
    training step done) and ``checkpoint`` (a checkpoint written). Unset: no effect."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def git_hash(cwd: str | os.PathLike | None = None) -> str | None:
    """Commit of the source tree (``+dirty`` when it has uncommitted changes), or None."""
    where = Path(cwd) if cwd is not None else Path(rigl.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    return {
        "rigl": rigl.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def provenance(argv: Iterable[str] | None = None) -> dict[str, Any]:
    """What produced a run: command line, git hash, versions, machine."""
    return {
        "command": " ".join(sys.argv if argv is None else ["rigl", *argv]),
        "git": git_hash(),
        "versions": versions(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


class CsvLog:
    """Append-only CSV with a fixed header; ``truncate(n)`` drops rows after the n-th.

    Resuming a killed run truncates each log to the row count stored in its checkpoint,
    so rows written after that checkpoint are not duplicated.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str]) -> None:
        self.path = Path(path)
        self.columns = columns
        self.rows = 0
        if not self.path.exists():
            atomic_write_text(self.path, ",".join(columns) + "\n")

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path.name} has no columns {sorted(unknown)}")
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([_cell(row.get(c)) for c in self.columns])
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
        self.rows += 1

    def truncate(self, rows: int) -> None:
        """Keep the header and the first ``rows`` data rows."""
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        atomic_write_text(self.path, "".join(lines[: rows + 1]))
        self.rows = rows


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def claim_output_folder(
    out: Path, tool: str, is_ours: Callable[[Path], bool] = lambda out: False
) -> None:
    """Make ``out`` the output folder of ``tool`` (``"compare"``, ``"report"``), or raise a
    ConfigError before anything in it is written: a folder is ``tool``'s when it is new or
    empty, holds ``tool``'s marker (``.rigl-<tool>.json``, written here), or ``is_ours``
    recognises it (a folder written before markers existed). Anything else is somebody's
    folder, whose ``results.md`` or ``index.html`` must not be overwritten."""
    from rigl.config import ConfigError

    marker = out / f".rigl-{tool}.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    if marker.exists():
        return
    others = sorted(p.name for p in out.iterdir())
    if others and not is_ours(out):
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(
            f"--out {str(out)!r} is not empty ({shown}) and was not written by rigl {tool} "
            f"(no {marker.name}); nothing in it was changed. Give a new or empty folder"
        )
    note = f"written by rigl {tool}: it rewrites its own files in this folder"
    write_json(marker, {"rigl": rigl.__version__, "note": note})
