"""Everything a training run is built from a config: data, model, optimizer, LR
schedule, sparsifier, callbacks, and the numbers of ``final.json`` (params, FLOPs)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rigl
from rigl.config import ConfigError
from rigl.experiments.callbacks import MetricsLog, TensorBoardLog, make_recorders
from rigl.experiments.config import ExperimentConfig


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
    data: Any  # rigl.experiments.data.DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sparsifier: rigl.Sparsifier
    device: torch.device
    steps_per_epoch: int
    total_steps: int
    width: float
    callbacks: list[Any] = field(default_factory=list)
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already trained on
    stats: EpochStats = field(default_factory=EpochStats)
    last_eval: dict[str, Any] | None = None
    elapsed_before: float = 0.0  # training seconds of earlier processes (resume)
    started: float = field(default_factory=time.perf_counter)

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
            "sparsity": 0.0 if c.method == "dense" else c.sparsity,
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


def build(config: ExperimentConfig, out: Path, extra_callbacks: Sequence[Any] = ()) -> Run:
    from rigl.experiments.data import load_dataset

    device = make_device(config.device)
    data = load_dataset(config.dataset, root=config.data_root, **config.dataset_options)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total = config.total_steps(steps_per_epoch)
    width = solve_width(config, data)
    torch.manual_seed(config.seed)  # model initialisation, then dropout etc.
    model = make_model(config, data, width).to(device)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))
    sparsifier = make_sparsifier(config, model, optimizer, total)
    callbacks: list[Any] = [MetricsLog(out / "metrics.csv", config.log_every)]
    callbacks += make_recorders(config.recorders, out, config, data.input_shape)
    board = TensorBoardLog.create(out / "tb") if config.tensorboard else None
    callbacks += [board] if board is not None else []
    callbacks += list(extra_callbacks)
    return Run(
        config, out, data, model, optimizer, scheduler, sparsifier, device,
        steps_per_epoch, total, width, callbacks,
    )  # fmt: skip


def make_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: CUDA is not available on this machine")
    return device


def make_model(config: ExperimentConfig, data: Any, width: float) -> nn.Module:
    from rigl.experiments.models import build_model

    return build_model(
        config.model,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        width=width,
        **config.model_options,
    )


def make_optimizer(config: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    params, lr, wd = model.parameters(), config.lr, config.weight_decay
    if config.optimizer == "sgd":
        nesterov = config.nesterov and config.momentum > 0
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=nesterov, weight_decay=wd
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def lr_factor(config: ExperimentConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step t: warm-up, then step decay or cosine."""
    milestones = sorted(
        round(m * total_steps) if isinstance(m, float) else config.scaled_step(m)
        for m in config.lr_milestones
    )
    warmup = config.scaled_step(config.warmup_steps)

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if config.lr_schedule == "step":
            scale *= config.lr_gamma ** sum(step >= m for m in milestones)
        elif config.lr_schedule == "cosine":
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return scale

    return factor


def make_sparsifier(
    config: ExperimentConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total: int
) -> rigl.Sparsifier:
    options = dict(config.method_options)
    if isinstance(options.get("begin_step"), int):
        options["begin_step"] = config.scaled_step(options["begin_step"])
    return rigl.create(
        config.method,
        model,
        optimizer,
        sparsity=config.sparsity,
        distribution=config.distribution,
        total_steps=total,
        update_interval=config.update_interval,
        end_step=config.scaled_step(config.end_step),
        drop_fraction=config.drop_fraction,
        decay=config.decay,
        seed=config.seed,
        first_layer_dense=config.first_layer_dense,
        last_layer_dense=config.last_layer_dense,
        **options,
    )


def progress_bar(run: Run, quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    label = f"{run.config.method} {run.config.sparsity:g}"
    return tqdm(total=run.total_steps, initial=run.step, desc=label, unit="step", leave=False)


# -- width rules and the numbers of final.json ----------------------------------------------
def _sparsity_options(config: ExperimentConfig) -> dict[str, Any]:
    return {
        "first_layer_dense": config.first_layer_dense,
        "last_layer_dense": config.last_layer_dense,
    }


def solve_width(config: ExperimentConfig, data: Any) -> float:
    """``config.width``, or the Small-Dense / Big-Sparse width of rigl.flops' solvers."""
    if config.width_rule == "fixed":
        return config.width
    from rigl import flops

    def build(width: float) -> nn.Module:
        return make_model(config, data, width)

    example = data.train[:2][0]
    solver = (
        flops.small_dense_width if config.width_rule == "small_dense" else flops.big_sparse_width
    )
    return (
        float(
            solver(
                build,
                example,
                config.sparsity,
                distribution=config.distribution,
                **_sparsity_options(config),
            )
        )
        * config.width
    )


def final_numbers(run: Run) -> dict[str, Any]:
    """Test accuracy, active parameters and FLOPs relative to the dense model."""
    from rigl.flops import count_flops, train_flops_ratio

    config, model = run.config, run.model
    densities = {s.name: s.density for s in run.sparsifier.summary()}
    example = run.data.test[:2][0].to(run.device)
    report = count_flops(model, example, densities)
    f_reference = report.flops_dense
    if run.width != 1.0:  # relative to the dense model at width 1
        f_reference = count_flops(
            make_model(config, run.data, 1.0).to(run.device), example
        ).flops_dense
    method = config.method
    pruning = {}
    schedule = run.sparsifier.schedule
    if method == "gmp":
        pruning = {
            "pruning_begin": schedule.begin_step / run.total_steps,
            "pruning_end": min(
                1.0, max(schedule.end_step, schedule.begin_step + 1) / run.total_steps
            ),
            "pruning_interval": schedule.update_interval / run.total_steps,
        }
    train_ratio = train_flops_ratio(
        method,
        report.flops_sparse,
        report.flops_dense,
        update_interval=config.update_interval,
        multiplier=config.multiplier,
        **pruning,
    ) * (report.flops_dense / f_reference)
    n_params = sum(p.numel() for p in model.parameters())
    inactive = sum(w.numel - w.n_active for w in run.sparsifier.weights)
    last = run.last_eval or {}
    return {
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        "train_accuracy": last.get("train_accuracy"),
        "train_loss": last.get("train_loss"),
        "params": n_params - inactive,
        "params_dense": n_params,
        "density": run.density(),
        "inference_flops": report.flops_sparse,
        "dense_inference_flops": f_reference,
        "inference_flops_ratio": report.flops_sparse / f_reference,
        "train_flops_ratio": train_ratio,
        "skipped_updates": run.sparsifier.skipped_updates,
    }
