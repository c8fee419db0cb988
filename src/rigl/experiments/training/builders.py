"""How a training run (:class:`~rigl.experiments.training.state.Run`) is built from a
config: data, model, optimizer, LR schedule, sparsifier, callbacks, and the numbers of
``final.json`` (params, FLOPs).

Under ``torchrun`` every rank builds the same run (same seed, same model, same masks);
only the main process gets the callbacks, since they write the run folder's files."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rigl
from rigl import distributed
from rigl.config import ConfigError
from rigl.distributed import DistEnv
from rigl.experiments.config import ExperimentConfig
from rigl.experiments.training import measures
from rigl.experiments.training.callbacks import MetricsLog, TensorBoardLog, make_recorders
from rigl.experiments.training.state import Run


def check_packages(config: ExperimentConfig) -> None:
    """A package the config asks for but is missing: an error before data or files
    (:func:`rigl.experiments.training.train.train` calls it before it makes the run folder)."""
    if config.tensorboard is True:
        TensorBoardLog.writer_class(required=True)


def build(
    config: ExperimentConfig,
    out: Path,
    extra_callbacks: Sequence[Any] = (),
    *,
    env: DistEnv | None = None,
    data: Any = None,
) -> Run:
    """The run of ``config``; ``data``: the dataset if already loaded. With a distributed
    ``env`` the device is the rank's (``cuda:LOCAL_RANK`` or the CPU) and only the main
    process gets callbacks (``extra_callbacks`` included)."""
    from rigl.experiments.data.datasets import load_dataset

    env = env or DistEnv()
    device = env.device if env.enabled else make_device(config.device)
    if data is None:
        data = load_dataset(config.dataset, root=config.data_root, **config.dataset_options)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total = config.total_steps(steps_per_epoch)
    width = measures.solve_width(config, data)
    torch.manual_seed(config.seed)  # model initialisation, then dropout etc.
    model = make_model(config, data, width).to(device)
    if sharded(config, env):  # FSDP2: shard first, then the optimizer and sparsifier
        from rigl.fsdp import shard_model

        shard_model(model)
    optimizer = make_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, total))
    sparsifier = make_sparsifier(config, model, optimizer, total)
    callbacks: list[Any] = []
    if env.is_main:
        callbacks.append(MetricsLog(out / "metrics.csv", config.log_every))
        callbacks += make_recorders(config.recorders, out, config, data.input_shape)
        if config.tensorboard is not False:  # null: where installed; true: required
            board = TensorBoardLog.create(out / "tb", required=config.tensorboard is True)
            callbacks += [board] if board is not None else []
        callbacks += list(extra_callbacks)
    return Run(
        config, out, data, model, optimizer, scheduler, sparsifier, device,
        steps_per_epoch, total, width, callbacks, make_augment(config.augment), env,
    )  # fmt: skip


def distribute(run: Run) -> None:
    """Wrap the model in DDP (a no-op in one process), check that every rank starts from
    rank 0's sparse model, and add the optional consistency check. Call it after loading
    a checkpoint: DDP keeps the parameter objects it was given."""
    model, env = run.model, run.env
    every = run.config.check_consistency_every
    if not env.enabled or sharded(run.config, env):  # FSDP: sharded in build()
        run.train_model = model
        if every and env.enabled:
            distributed.add_consistency_check(run.sparsifier, every=every)
        return
    run.train_model = distributed.wrap_model(model, env, **_buffer_sync(model))
    distributed.sync_sparsifier(run.sparsifier)
    if every:
        distributed.add_consistency_check(run.sparsifier, every=every)


def sharded(config: ExperimentConfig, env: DistEnv) -> bool:
    """Whether this run shards its model with FSDP2 (``parallel: fsdp`` under torchrun)."""
    return env.enabled and config.parallel == "fsdp"


def _buffer_sync(model: nn.Module) -> dict[str, bool]:
    """DDP keyword turning off its buffer broadcast before every forward when the model
    has no floating-point buffers (BatchNorm statistics need it; the integer index
    buffers of the sparse backend, equal on every rank, would only cost bandwidth)."""
    if any(b.is_floating_point() for b in model.buffers()):
        return {}
    import inspect

    known = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
    return {name: False}


def crop_flip(x: Tensor, pad: int = 4, *, offset: int = 0, total: int | None = None) -> Tensor:
    """Standard CIFAR augmentation: a random crop of the zero-padded image, flipped
    horizontally with probability 1/2. Draws come from torch's global CPU generator,
    whose state is saved in checkpoints.

    ``x`` may be rows ``offset .. offset + B - 1`` of a global batch of ``total`` rows (a
    data-parallel rank's shard): the draws are made for the whole batch and sliced, so the
    ranks together crop as one process would, and the generators stay in step."""
    batch, channels, height, width = x.shape  # (B, C, H, W)
    total = batch if total is None else total
    rows_of_x = slice(offset, offset + batch)
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    top = torch.randint(0, 2 * pad + 1, (total, 1))[rows_of_x]
    left = torch.randint(0, 2 * pad + 1, (total, 1))[rows_of_x]
    flip = (torch.rand(total, 1) < 0.5)[rows_of_x]
    rows = top + torch.arange(height)  # (B, H)
    cols = left + torch.arange(width)  # (B, W)
    cols = torch.where(flip, cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    c = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def make_augment(name: str) -> Callable[..., Tensor] | None:
    return crop_flip if name == "crop_flip" else None


def make_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device={name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name!r}: CUDA is not available on this machine; use device: cpu "
            "(--device cpu)"
        )
    return device


def make_model(config: ExperimentConfig, data: Any, width: float) -> nn.Module:
    from rigl.experiments.models.zoo import build_model

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
        pattern=config.pattern,
        backend=config.backend,
        **options,
    )


def progress_bar(run: Run, quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    label = f"{run.config.method} {run.config.sparsity:g}"
    return tqdm(total=run.total_steps, initial=run.step, desc=label, unit="step", leave=False)
