"""Training callbacks: the metrics log, the topology log, TensorBoard, and a registry.

A callback is any callable ``callback(step, model, sparsifier, metrics)``. The training
loop calls every callback after each optimizer step (``metrics["kind"] == "step"``) and
after each epoch (``"epoch"``, same ``step``); ``step`` counts completed optimizer steps.
Optional methods: ``close()`` at the end of training, and ``state_dict()`` /
``load_state_dict(state)`` to be saved in, and restored from, the run's checkpoint.

Recorders named in the config's ``recorders`` list are built by their registered
factory ``factory(run_dir, config, input_shape) -> callback``; adding one is one
``@register_recorder("name", outputs=[...])`` line, and the loop is never touched. The
``outputs`` (file names in the run folder) are listed in the folder's marker: they are
what ``--overwrite`` deletes (see :mod:`rigl.experiments.training.folder`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rigl._extras import install_hint
from rigl.config import ConfigError
from rigl.experiments.runio import CsvLog

Callback = Callable[[int, Any, Any, dict[str, Any]], None]
RecorderFactory = Callable[[Path, Any, tuple[int, ...]], Callback]

_RECORDERS: dict[str, RecorderFactory | str] = {
    # name -> factory, or "module:function" imported on first use
    "dynamics": "rigl.experiments.training.callbacks:_dynamics_recorder",
}
_OUTPUTS: dict[str, tuple[str, ...]] = {  # name -> the files it writes in the run folder
    "dynamics": ("dynamics.csv", "lifetimes.csv", "alive.csv", "first_layer.npz"),
}


def register_recorder(
    name: str, outputs: Iterable[str] = ()
) -> Callable[[RecorderFactory], RecorderFactory]:
    """Decorator adding a recorder factory under ``name`` (usable in ``recorders: [...]``);
    ``outputs``: the names of the files it writes in the run folder (``--overwrite`` and a
    restarted run delete those, and only those, so list every one)."""

    def decorate(factory: RecorderFactory) -> RecorderFactory:
        _RECORDERS[name] = factory
        _OUTPUTS[name] = tuple(outputs)
        return factory

    return decorate


def list_recorders() -> list[str]:
    return sorted(_RECORDERS)


def recorder_outputs(names: Iterable[str]) -> list[str]:
    """The run-folder files written by the recorders ``names``."""
    return [file for name in names for file in _OUTPUTS.get(name, ())]


def make_recorders(
    names: list[str], run_dir: Path, config: Any, input_shape: tuple[int, ...]
) -> list[Callback]:
    callbacks = []
    for name in names:
        factory = _RECORDERS[name]
        if isinstance(factory, str):
            module, attr = factory.split(":")
            factory = getattr(importlib.import_module(module), attr)
        callbacks.append(factory(run_dir, config, input_shape))
    return callbacks


# -- the metrics log ------------------------------------------------------------------------
METRIC_COLUMNS = [
    "kind",  # "step": training-loss sample; "epoch": end-of-epoch evaluation
    "step",  # optimizer steps completed
    "epoch",
    "loss",  # mean training loss over the steps since the previous "step" row
    "lr",
    "drop_fraction",  # f_decay(t) of the update schedule (empty for methods without one)
    "density",  # active fraction of the sparsified weights
    "train_loss",  # running mean over the epoch's batches
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "elapsed_s",
]


class MetricsLog:
    """``metrics.csv``: a row every ``every`` steps and one per epoch."""

    def __init__(self, path: Path, every: int) -> None:
        self.log = CsvLog(path, METRIC_COLUMNS)
        self.every = every
        self.loss_sum = 0.0
        self.loss_count = 0

    def __call__(self, step: int, model: Any, sparsifier: Any, metrics: dict[str, Any]) -> None:
        row = {k: metrics.get(k) for k in METRIC_COLUMNS if k in metrics}
        if metrics["kind"] == "epoch":
            self.log.append(row)
            return
        self.loss_sum += float(metrics["loss"])
        self.loss_count += 1
        if step % self.every == 0 or metrics.get("last"):
            row["loss"] = self.loss_sum / self.loss_count
            self.log.append(row)
            self.loss_sum, self.loss_count = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.log.rows, "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.truncate(int(state["rows"]))
        self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])


# -- the topology log -----------------------------------------------------------------------
TOPOLOGY_COLUMNS = ["step", "layer", "n_active", "n_dropped", "n_grown", "drop_fraction"]


class TopologyLog:
    """``topology.csv``: ``sparsifier.last_update`` (one row per layer) after each update.

    ``step`` is the optimizer step during which the update happened (``t`` with
    ``t % ΔT == 0``); ``drop_fraction`` is the schedule's f_decay(t) at that step.
    """

    def __init__(self, path: Path) -> None:
        self.log = CsvLog(path, TOPOLOGY_COLUMNS)
        self.seen = 0  # sparsifier.update_count already written

    def __call__(self, step: int, model: Any, sparsifier: Any, metrics: dict[str, Any]) -> None:
        if sparsifier.update_count == self.seen or sparsifier.last_update is None:
            return
        self.seen = sparsifier.update_count
        schedule = getattr(sparsifier, "schedule", None)
        fraction = schedule.fraction(step - 1) if hasattr(schedule, "fraction") else None
        for stats in sparsifier.last_update:
            self.log.append(
                {
                    "step": step - 1,
                    "layer": stats.name,
                    "n_active": stats.n_active,
                    "n_dropped": stats.n_dropped,
                    "n_grown": stats.n_grown,
                    "drop_fraction": fraction,
                }
            )

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.log.rows, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.truncate(int(state["rows"]))
        self.seen = int(state["seen"])


@register_recorder("topology", outputs=["topology.csv"])
def _topology_recorder(run_dir: Path, config: Any, input_shape: tuple[int, ...]) -> Callback:
    return TopologyLog(run_dir / "topology.csv")


def _dynamics_recorder(run_dir: Path, config: Any, input_shape: tuple[int, ...]) -> Callback:
    # the report's mask-dynamics recorder
    from rigl.experiments.training.recorder import MaskRecorder

    return MaskRecorder(run_dir, input_shape=tuple(input_shape))


# -- TensorBoard ------------------------------------------------------------------------------
class TensorBoardLog:
    """Scalars under ``tb/`` through ``torch.utils.tensorboard`` (the ``tensorboard``
    package, in the ``tensorboard`` extra)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @staticmethod
    def writer_class(*, required: bool) -> type | None:
        """``SummaryWriter``; when the package is missing, None if not ``required`` (config
        ``tensorboard: null``, the default), else an error naming it (``true``)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            if not required:
                return None
            raise ConfigError(
                "tensorboard=true, but the tensorboard package is not installed: "
                f"{install_hint('tensorboard')} (or tensorboard: null to log only where it "
                "is installed, false for never)"
            ) from exc
        return SummaryWriter

    @classmethod
    def create(cls, folder: Path, *, required: bool) -> TensorBoardLog | None:
        writer = cls.writer_class(required=required)
        return None if writer is None else cls(writer(log_dir=str(folder)))

    def __call__(self, step: int, model: Any, sparsifier: Any, metrics: dict[str, Any]) -> None:
        prefix = "train_step" if metrics["kind"] == "step" else "epoch"
        scalars = ["loss", "lr", "drop_fraction", "density"]
        scalars += [k for k in metrics if k.startswith(("train_", "test_"))]
        for key in scalars:
            value = metrics.get(key)
            if isinstance(value, int | float):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()
