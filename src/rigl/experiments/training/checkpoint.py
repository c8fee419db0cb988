"""A `rigl train` checkpoint: written to continue bit-identically, read (to resume) checked
before anything is changed.

:func:`save_checkpoint` writes ``checkpoint.pt`` atomically, so a killed run never leaves
half of one; a damaged, foreign or other run's file can still be
found there (a copy, a full disk, a hand edit). :func:`read_checkpoint` turns each of those
into a ``ConfigError`` naming the file and the way out, before any state is loaded and
before any log is cut back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rigl.config import ConfigError
from rigl.experiments.config import ExperimentConfig
from rigl.experiments.runio import atomic_torch_save, kill_point
from rigl.experiments.training import sharded_checkpoint
from rigl.experiments.training.builders import sharded
from rigl.experiments.training.folder import CHECKPOINT, config_changes
from rigl.experiments.training.ranks import sum_over_ranks
from rigl.experiments.training.state import Run

# what save_checkpoint writes and load_checkpoint reads
KEYS = (
    "config", "model", "optimizer", "scheduler", "sparsifier", "epoch", "batch", "torch_rng",
    "epoch_stats", "last_eval", "callbacks", "elapsed_s",
)  # fmt: skip


def read_checkpoint(path: Path, config: ExperimentConfig, device: Any = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be a `rigl train` checkpoint of a run with
    ``config``; a ConfigError saying what is wrong otherwise."""
    restart = "start the run again with --overwrite (its logs are rewritten)"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except MemoryError:
        raise  # the file may be fine: no advice to start again
    except PermissionError as exc:
        raise ConfigError(
            f"--resume: {str(path)!r} cannot be read ({exc.strerror}); give this user read "
            "permission and resume again"
        ) from exc
    except Exception as exc:  # empty, truncated (torch: OSError), not a torch file: damage
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc):  # torch's advice to load it unsafely does not apply
            reason = "not a file of plain tensors"
        raise ConfigError(
            f"--resume: {str(path)!r} cannot be read ({reason}): it is damaged or not a "
            f"rigl checkpoint; {restart}"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        what = type(state).__name__
        raise ConfigError(
            f"--resume: {str(path)!r} is not a rigl train checkpoint (it holds a {what} "
            f"without a config); {restart}"
        )
    sharded = ("model", "optimizer", "sparsifier") if "sharded" in state else ()  # in DCP
    missing = [key for key in KEYS if key not in state and key not in sharded]
    if missing:
        raise ConfigError(
            f"--resume: {str(path)!r} is not a complete rigl train checkpoint (no "
            f"{', '.join(missing)}); {restart}"
        )
    changed = config_changes(state["config"], config)
    if changed:
        saved = ", ".join(f"{k}={state['config'][k]!r}" for k in changed)
        raise ConfigError(
            f"--resume: the config differs from the one {str(path)!r} was trained with in "
            f"{changed} (the checkpoint has {saved}). If the run's config.yaml was edited, "
            "put those values back; if the checkpoint comes from another run, put it back "
            f"in its own run folder; or {restart}"
        )
    return state


def load_checkpoint(run: Any, state: dict[str, Any]) -> None:
    """Continue ``run`` (a :class:`rigl.experiments.training.state.Run`) from ``state``."""
    try:
        if "sharded" in state:  # FSDP: model, optimizer and masks from the DCP folder
            sharded_checkpoint.load(run, state["sharded"])
        else:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.sparsifier.load_state_dict(state["sparsifier"])
        run.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise ConfigError(
            f"--resume: the checkpoint in {str(run.out)!r} does not fit the model of this "
            f"run ({str(exc).strip().splitlines()[0]}); start the run again with --overwrite"
        ) from exc
    run.epoch, run.batch = int(state["epoch"]), int(state["batch"])
    torch.set_rng_state(state["torch_rng"].cpu())
    run.stats.load_state_dict(state["epoch_stats"])
    run.last_eval = state["last_eval"]
    for callback, cb_state in zip(run.callbacks, state["callbacks"], strict=False):
        if cb_state and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(cb_state)
    run.elapsed_before = float(state["elapsed_s"])
    run.cpu_before = float(state.get("cpu_time_s", 0.0))


def save_checkpoint(run: Run) -> None:
    """Everything needed to continue bit-identically, written atomically (by rank 0:
    every rank holds the same state)."""
    cpu_time = cpu_time_of_all_ranks(run)
    if sharded(run.config, run.env):  # FSDP: every rank writes its shards
        state: dict[str, Any] = {"sharded": sharded_checkpoint.save(run)}
    elif not run.env.is_main:
        return
    else:
        state = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "sparsifier": run.sparsifier.state_dict(),
        }
    if not run.env.is_main:
        return
    state |= {
        "config": run.config.to_dict(),
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "epoch": run.epoch,
        "batch": run.batch,  # batches of `epoch` consumed; its order is epoch_order(seed, epoch)
        "data_order": {"seed": run.config.seed, "epoch": run.epoch, "batches_done": run.batch},
        "torch_rng": torch.get_rng_state(),
        "epoch_stats": run.stats.state_dict(),
        "last_eval": run.last_eval,
        "callbacks": [getattr(cb, "state_dict", dict)() for cb in run.callbacks],
        "elapsed_s": run.elapsed(),
        "cpu_time_s": cpu_time,
    }
    atomic_torch_save(run.out / CHECKPOINT, state)
    if "sharded" in state:
        sharded_checkpoint.remove_others(run.out, state["sharded"])
    kill_point("checkpoint")


def cpu_time_of_all_ranks(run: Run) -> float:
    """CPU seconds of the run's processes: earlier ones (resume) plus every rank's own."""
    own = run.cpu_time() - run.cpu_before
    return run.cpu_before + sum_over_ranks([own], run.env)[0]
