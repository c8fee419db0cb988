"""`rigl train`: one sparse training run from a config, resumable to the same result.

``train(config)`` reads top to bottom: prepare the run folder -> :func:`build` ->
:func:`train_one_epoch` / :func:`end_epoch` until the step budget is spent ->
:func:`finish` (final checkpoint, ``final.json``).

Determinism: the data order of epoch ``e`` is a permutation drawn from a generator
seeded by ``(seed, e)``, so a run resumed mid-epoch recomputes the same permutation and
skips the batches it had consumed. With the model, optimizer, LR scheduler, sparsifier
and torch RNG states in the checkpoint, a resumed run ends with bit-identical weights.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rigl.config import ConfigError
from rigl.experiments import builders, measures
from rigl.experiments.builders import Run
from rigl.experiments.config import ExperimentConfig, load_config
from rigl.experiments.runio import atomic_torch_save, provenance, read_json, write_json

CHECKPOINT = "checkpoint.pt"
FINAL = "final.json"
EVAL_BATCH = 1024


# -- data order ----------------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The permutation of the ``n`` training examples used in ``epoch``: a function of
    ``(seed, epoch)`` only, so it can be recomputed when resuming mid-epoch."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n, generator=generator)


def iterate_batches(
    dataset: Any, order: Tensor, batch_size: int, start: int, stop: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``start .. stop-1`` of ``dataset`` in ``order``."""
    tensors = getattr(dataset, "tensors", None)
    for b in range(start, stop):
        index = order[b * batch_size : (b + 1) * batch_size]
        if tensors is not None:
            yield tensors[0][index], tensors[1][index]
        else:
            yield torch.utils.data.default_collate([dataset[int(i)] for i in index])


# -- one epoch ------------------------------------------------------------------------------
def loss_and_correct(logits: Tensor, target: Tensor) -> tuple[Tensor, int, int]:
    """Cross-entropy and the number of correct predictions; sequence outputs
    ``(B, T, C)`` with targets ``(B, T)`` count every position."""
    logits = logits.reshape(-1, logits.shape[-1])  # (B*, C)
    target = target.reshape(-1)  # (B*,)
    loss = F.cross_entropy(logits, target)
    correct = int((logits.argmax(dim=1) == target).sum())
    return loss, correct, target.numel()


def train_one_epoch(run: Run, progress: Any = None) -> None:
    """Train on the rest of ``run.epoch`` (from batch ``run.batch``) or until the budget."""
    config, data = run.config, run.data
    order = epoch_order(config.seed, run.epoch, len(data.train))
    stop = run.batches_in_epoch(run.epoch)
    run.model.train()
    for x, y in iterate_batches(data.train, order, config.batch_size, run.batch, stop):
        x, y = x.to(run.device), y.to(run.device)
        if run.augment is not None:
            x = run.augment(x)
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.zero_grad(set_to_none=True)
        loss, correct, count = loss_and_correct(run.model(x), y)
        loss.backward()
        run.sparsifier.step()  # replaces optimizer.step(); may update the topology
        run.scheduler.step()
        run.batch += 1
        loss_value = loss.item()
        run.stats.add(loss_value, correct, count)
        step_metrics = {"kind": "step", "loss": loss_value, "lr": lr, **run.progress_metrics()}
        run.notify(step_metrics)
        if progress is not None:
            progress.update(1)
            if run.step % 20 == 0:
                progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if config.checkpoint_every and run.step % config.checkpoint_every == 0:
            save_checkpoint(run)


@torch.no_grad()
def evaluate(run: Run, dataset: Any) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on ``dataset``."""
    run.model.eval()
    order = torch.arange(len(dataset))
    n_batches = math.ceil(len(dataset) / EVAL_BATCH)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in iterate_batches(dataset, order, EVAL_BATCH, 0, n_batches):
        loss, c, n = loss_and_correct(run.model(x.to(run.device)), y.to(run.device))
        loss_sum, correct, count = loss_sum + loss.item() * n, correct + c, count + n
    run.model.train()
    return loss_sum / count, correct / count


def end_epoch(run: Run) -> dict[str, Any]:
    """Evaluate (every ``eval_every`` epochs and after the last), notify, advance the epoch."""
    last = run.epoch + 1 == run.epochs
    metrics: dict[str, Any] = {"kind": "epoch", **run.progress_metrics(), **run.stats.means()}
    if last or (run.epoch + 1) % run.config.eval_every == 0:
        metrics["test_loss"], metrics["test_accuracy"] = evaluate(run, run.data.test)
        run.last_eval = metrics
    run.notify(metrics)
    run.epoch, run.batch = run.epoch + 1, 0
    run.stats.reset()
    return metrics


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(run: Run) -> None:
    """Everything needed to continue bit-identically, written atomically."""
    state = {
        "config": run.config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "sparsifier": run.sparsifier.state_dict(),
        "step": run.step,
        "epoch": run.epoch,
        "batch": run.batch,  # batches of `epoch` consumed; its order is epoch_order(seed, epoch)
        "data_order": {"seed": run.config.seed, "epoch": run.epoch, "batches_done": run.batch},
        "torch_rng": torch.get_rng_state(),
        "epoch_stats": run.stats.state_dict(),
        "last_eval": run.last_eval,
        "callbacks": [getattr(cb, "state_dict", dict)() for cb in run.callbacks],
        "elapsed_s": run.elapsed(),
        "cpu_time_s": run.cpu_time(),
    }
    atomic_torch_save(run.out / CHECKPOINT, state)


def load_checkpoint(run: Run) -> None:
    state = torch.load(run.out / CHECKPOINT, map_location=run.device, weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sparsifier.load_state_dict(state["sparsifier"])
    run.epoch, run.batch = int(state["epoch"]), int(state["batch"])
    torch.set_rng_state(state["torch_rng"].cpu())
    run.stats.load_state_dict(state["epoch_stats"])
    run.last_eval = state["last_eval"]
    for callback, cb_state in zip(run.callbacks, state["callbacks"], strict=False):
        if cb_state and hasattr(callback, "load_state_dict"):
            callback.load_state_dict(cb_state)
    run.elapsed_before = float(state["elapsed_s"])
    run.cpu_before = float(state.get("cpu_time_s", 0.0))


# -- the whole run -------------------------------------------------------------------------
def prepare_out(config: ExperimentConfig, *, resume: bool, overwrite: bool) -> Path:
    """Check the run folder before anything is trained; returns it."""
    out = Path(config.out)
    saved = out / "config.yaml"
    if resume and saved.exists():
        before = load_config(saved).to_dict()
        changed = sorted(
            k for k, v in config.to_dict().items() if before[k] != v and k not in ("out", "device")
        )
        if changed:
            raise ConfigError(
                f"--resume: the config differs from the run's {str(saved)!r} in {changed}; "
                "resume with the same settings or start a new run folder"
            )
        if not (out / CHECKPOINT).exists() and not (out / FINAL).exists():
            shutil.rmtree(out)  # killed before its first checkpoint: start again
    elif out.exists() and any(out.iterdir()):
        if not saved.exists():
            raise ConfigError(f"out={str(out)!r} exists and is not a run folder (no config.yaml)")
        if not overwrite:
            raise ConfigError(
                f"out={str(out)!r} already holds a run; pass --resume to continue it or "
                "--overwrite to start it again"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the training described by ``config``; returns ``final.json``."""
    out = prepare_out(config, resume=resume, overwrite=overwrite)
    if (out / FINAL).exists():
        return read_json(out / FINAL)
    fresh = not (out / CHECKPOINT).exists()
    run = builders.build(config, out, extra_callbacks=callbacks)
    if fresh:
        config.save(out / "config.yaml")
        write_json(out / "run.json", {**provenance(argv), **run.describe()})
    else:
        load_checkpoint(run)
        info = read_json(out / "run.json")
        info.setdefault("resumed", []).append({"command": provenance(argv)["command"]})
        write_json(out / "run.json", info)
    progress = builders.progress_bar(run, quiet)
    try:
        while run.epoch < run.epochs:
            train_one_epoch(run, progress)
            end_epoch(run)
    finally:
        if progress is not None:
            progress.close()
    return finish(run, quiet)


def finish(run: Run, quiet: bool) -> dict[str, Any]:
    save_checkpoint(run)
    run.close_callbacks()
    final = {
        **run.describe(),
        **measures.final_numbers(run),
        "wall_time_s": run.elapsed(),
        "cpu_time_s": run.cpu_time(),
    }
    write_json(run.out / FINAL, final)  # written last: its presence marks a finished run
    if not quiet:
        print(
            f"{run.config.method} sparsity {run.config.sparsity:g}: test accuracy "
            f"{final['test_accuracy']:.4f}, {final['wall_time_s']:.1f} s -> {run.out}",
            file=sys.stderr,
        )
    return final


# -- command line ---------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train one model from a config file (flags override it)",
        description="Train one sparse model. Every config key is also a flag: "
        "--key value (YAML syntax for values: 0.1, 1e-3, true, [100, 200], {a: 1}).",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_config_flags(parser)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    from dataclasses import fields

    from rigl.experiments.config import parse_value

    group = parser.add_argument_group("config overrides")
    for f in fields(ExperimentConfig):
        if f.name in skip:
            continue
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        group.add_argument(
            *flags, dest=f.name, type=parse_value, default=argparse.SUPPRESS, metavar="VALUE"
        )


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    from dataclasses import fields

    overrides = {f.name: getattr(args, f.name) for f in fields(ExperimentConfig) if f.name in args}
    path = args.config
    if path is None and args.resume and "out" in overrides:
        saved = Path(overrides["out"]) / "config.yaml"
        path = saved if saved.exists() else None  # resume from the run's own config
    return load_config(path, overrides)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    train(
        config,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
        argv=getattr(args, "argv", None),
    )
    return 0
