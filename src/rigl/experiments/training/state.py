"""The state of one training run (:class:`Run`: config, data, model, optimizer, sparsifier,
position in the schedule, clocks) and the running means of an epoch (:class:`EpochStats`);
:func:`rigl.experiments.training.builders.build` makes one from a config."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import rigl
from rigl.distributed import DistEnv
from rigl.experiments.config import ExperimentConfig
from rigl.registry import is_dense


@dataclass
class EpochStats:
    """Running training loss and accuracy over the batches of one epoch."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    batches: int = 0

    def add(self, loss: float, correct: int, count: int) -> None:
        self.loss_sum, self.batches = self.loss_sum + loss, self.batches + 1
        self.correct, self.count = self.correct + correct, self.count + count

    def means(self) -> dict[str, float]:
        if not self.batches:
            return {}
        return {
            "train_loss": self.loss_sum / self.batches,
            "train_accuracy": self.correct / self.count,
        }

    def reset(self) -> None:
        self.loss_sum, self.correct, self.count, self.batches = 0.0, 0, 0, 0

    def state_dict(self) -> dict[str, float]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.loss_sum, self.batches = float(state["loss_sum"]), int(state["batches"])
        self.correct, self.count = int(state["correct"]), int(state["count"])


@dataclass
class Run:
    """One training run: what :func:`build` made plus the position in training."""

    config: ExperimentConfig
    out: Path
    data: Any  # rigl.experiments.data.datasets.DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: rigl.Sparsifier
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    width: float
    callbacks: list[Any] = field(default_factory=list)  # empty on ranks other than 0
    augment: Callable[..., Tensor] | None = None
    env: DistEnv = field(default_factory=DistEnv)  # this process's place in a torchrun job
    train_model: nn.Module | None = None  # `model` wrapped in DDP when distributed
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained on
    stats: EpochStats = field(default_factory=EpochStats)
    last_eval: dict[str, Any] | None = None
    elapsed_before: float = 0.0  # training seconds of earlier processes (resume)
    cpu_before: float = 0.0  # their CPU seconds
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)

    @property
    def step(self) -> int:
        return self.sparsifier.step_count

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def batches_in_epoch(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def cpu_time(self) -> float:
        """CPU seconds of this run's processes: its wall time on an otherwise idle core
        when it runs with one thread (as in `rigl compare`)."""
        return self.cpu_before + time.process_time() - self.started_cpu

    def density(self) -> float:
        weights = self.sparsifier.weights
        return sum(w.n_active for w in weights) / max(1, sum(w.numel for w in weights))

    def progress_metrics(self) -> dict[str, Any]:
        schedule = getattr(self.sparsifier, "schedule", None)
        fraction = schedule.fraction(self.step - 1) if hasattr(schedule, "fraction") else None
        return {
            "step": self.step,
            "epoch": self.epoch,
            "drop_fraction": fraction,
            "density": self.density(),
            "elapsed_s": round(self.elapsed(), 3),
            "last": self.step == self.total_steps,
        }

    def notify(self, metrics: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(self.step, self.model, self.sparsifier, metrics)

    def close_callbacks(self) -> None:
        for callback in self.callbacks:
            close = getattr(callback, "close", None)
            if callable(close):
                close()

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "method": c.method,
            "sparsity": 0.0 if is_dense(c.method) and c.width_rule == "fixed" else c.sparsity,
            "distribution": c.distribution,
            "seed": c.seed,
            "multiplier": c.multiplier,
            "dataset": c.dataset,
            "model": c.model,
            "width": self.width,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
        }
