"""`rigl train` checkpoints of an FSDP run (``parallel: fsdp``): the sharded part.

Model, optimizer and sparsifier are written by every rank with DCP
(:func:`rigl.fsdp.save`) into ``checkpoint.dcp/step-N`` of the run folder; rank 0 then
writes ``checkpoint.pt`` as for any run, with the rest of the state and ``sharded``
naming that folder, and removes the older step folders. A run killed in between resumes
from the ``checkpoint.pt`` before, whose folder is still there. The DCP folder loads on
any number of ranks: a run may resume with another world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rigl import distributed, fsdp
from rigl.config import ConfigError

FOLDER = "checkpoint.dcp"


def save(run: Any) -> str:
    """Write this rank's shards (a collective); the folder, relative to the run folder."""
    relative = f"{FOLDER}/step-{run.step:09d}"
    fsdp.save(run.out / relative, run.model, run.optimizer, run.sparsifier)
    distributed.barrier()  # every rank's shards are written before checkpoint.pt names them
    return relative


def remove_others(out: Path, keep: str) -> None:
    """Remove the step folders that ``checkpoint.pt`` no longer names (rank 0)."""
    for folder in (out / FOLDER).glob("step-*"):
        if folder != out / keep:
            shutil.rmtree(folder, ignore_errors=True)


def load(run: Any, relative: str) -> None:
    """Load the shards of ``relative`` into the run's model, optimizer and sparsifier."""
    folder = run.out / relative
    if not folder.is_dir():
        raise ConfigError(
            f"--resume: the sharded state {str(folder)!r} named by checkpoint.pt is missing; "
            "start the run again with --overwrite"
        )
    fsdp.load(folder, run.model, run.optimizer, run.sparsifier)
