"""`rigl train`: one sparse training run from a config, resumable to the same result.

``train(config)`` reads top to bottom: lock and prepare the run folder
(:mod:`~rigl.experiments.training.folder`) -> :func:`build` -> :func:`train_one_epoch` /
:func:`end_epoch` until the step budget is spent -> :func:`finish` (final checkpoint,
``final.json``).

Determinism: the data order of epoch ``e`` is a permutation drawn from a generator
seeded by ``(seed, e)``, so a run resumed mid-epoch recomputes the same permutation and
skips the batches it had consumed. With the model, optimizer, LR scheduler, sparsifier
and torch RNG states in the checkpoint, a resumed run ends with bit-identical weights.

Data parallel (``torchrun --nproc-per-node N -m rigl.cli train ...``): ``batch_size`` is
the global batch. Every rank draws the same global batches and trains on its contiguous
shard of each (:func:`rigl.distributed.shard`); DDP averages the gradients, so the
topology updates see the global batch's gradient and the run matches a one-process run
up to float rounding. Logged losses and accuracies are summed over the ranks (the test
set is split between them), so they are the global batch's and the full test set's.
Only rank 0 writes the run folder; every rank reads the checkpoint when resuming (with
several machines, ``out`` must be on a shared file system).

Over 300 lines: the run's life cycle reads top to bottom in one file (its helpers are
in the sibling modules).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rigl import distributed
from rigl.config import ConfigError
from rigl.distributed import DistEnv
from rigl.experiments.config import ExperimentConfig, load_config
from rigl.experiments.runio import (
    kill_point,
    provenance,
    read_json,
    write_json,
)
from rigl.experiments.training import builders, folder, measures
from rigl.experiments.training.batches import epoch_order, iterate_batches
from rigl.experiments.training.checkpoint import (
    cpu_time_of_all_ranks,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from rigl.experiments.training.folder import CHECKPOINT, FINAL
from rigl.experiments.training.ranks import (
    check_data_parallel,
    main_first,
    same_on_every_rank,
    sum_over_ranks,
)
from rigl.experiments.training.state import Run

EVAL_BATCH = 1024


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
    config, data, env = run.config, run.data, run.env
    order = epoch_order(config.seed, run.epoch, len(data.train))
    stop = run.batches_in_epoch(run.epoch)
    model = run.train_model or run.model  # DDP when distributed
    run.model.train()
    batches = iterate_batches(data.train, order, config.batch_size, run.batch, stop, env)
    for x, y in batches:
        size = len(order[run.batch * config.batch_size : (run.batch + 1) * config.batch_size])
        x, y = x.to(run.device), y.to(run.device)
        if run.augment is not None:
            x = run.augment(x, **_shard_position(size, env))
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.zero_grad(set_to_none=True)
        loss, correct, count = loss_and_correct(model(x), y)
        share = len(y) * env.world_size / size  # 1 unless the shards are unequal
        (loss * share if share != 1 else loss).backward()  # DDP: mean over ranks = global mean
        run.sparsifier.step()  # replaces optimizer.step(); may update the topology
        run.scheduler.step()
        run.batch += 1
        loss_value = loss.item()
        if env.enabled:  # the global batch's numbers, as one process would log them
            loss_sum, correct, count = sum_over_ranks([loss_value * count, correct, count], env)
            loss_value, correct, count = loss_sum / count, round(correct), round(count)
        run.stats.add(loss_value, correct, count)
        step_metrics = {"kind": "step", "loss": loss_value, "lr": lr, **run.progress_metrics()}
        run.notify(step_metrics)
        if progress is not None:
            progress.update(1)
            if run.step % 20 == 0:
                progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        if config.checkpoint_every and run.step % config.checkpoint_every == 0:
            save_checkpoint(run)
        kill_point("step")


def _shard_position(size: int, env: DistEnv) -> dict[str, int]:
    """Where this rank's shard sits in a global batch of ``size`` (for the augmentation)."""
    if not env.enabled:
        return {}
    rows = distributed.shard(torch.arange(size), env)
    return {"offset": int(rows[0]), "total": size}


@torch.no_grad()
def evaluate(run: Run, dataset: Any) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on ``dataset``; distributed, each rank
    evaluates its part of ``dataset`` with rank 0's buffers (BatchNorm statistics: the
    checkpoint's) and the sums are all-reduced."""
    env = run.env
    run.model.eval()
    order = torch.arange(len(dataset))
    if env.enabled:
        for buffer in run.model.buffers():
            if buffer.is_floating_point():  # BatchNorm statistics differ by rank
                torch.distributed.broadcast(buffer, src=0)
        order = torch.tensor_split(order, env.world_size)[env.rank]
    n_batches = math.ceil(len(order) / EVAL_BATCH)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in iterate_batches(dataset, order, EVAL_BATCH, 0, n_batches):
        loss, c, n = loss_and_correct(run.model(x.to(run.device)), y.to(run.device))
        loss_sum, correct, count = loss_sum + loss.item() * n, correct + c, count + n
    if builders.sharded(run.config, env):  # FSDP: a forward is a collective, so a rank
        most = math.ceil(math.ceil(len(dataset) / env.world_size) / EVAL_BATCH)
        x, _ = next(iterate_batches(dataset, torch.arange(1), 1, 0, 1))  # example 0
        for _ in range(most - n_batches):  # with fewer batches runs as many (unused)
            run.model(x.to(run.device))
    loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], env)
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


# -- the whole run -------------------------------------------------------------------------
def train(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the training described by ``config``; returns ``final.json``.

    Under ``torchrun`` every rank calls it (it joins the process group); ``callbacks``
    run on rank 0 only, which writes every file, and every rank returns ``final.json``."""
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in --out and --overwrite starts it again: pass one"
        )
    builders.make_device(config.device)  # a clear error before CUDA is touched
    builders.check_packages(config)  # before the run folder is made
    env = distributed.init_from_env(device=config.device)  # no-op in a single process
    check_data_parallel(config, env)
    loaded: dict[str, Any] = {}
    with contextlib.ExitStack() as held:  # rank 0 holds the run folder's lock to the end

        def prepare() -> tuple[dict[str, Any] | None, bool]:  # rank 0; the others wait
            if env.enabled:  # load (and cache) the data before the other ranks read it
                from rigl.experiments.data.datasets import load_dataset

                data = load_dataset(config.dataset, root=config.data_root, **config.dataset_options)
                check_data_parallel(config, env, len(data.train))
                loaded["data"] = data
            out = held.enter_context(
                folder.open_run(config, resume=resume, overwrite=overwrite)
            ).path
            if (out / FINAL).exists():
                return read_json(out / FINAL), False
            if (out / CHECKPOINT).exists():  # checked before anything is built or cut back
                device = env.device if env.enabled else builders.make_device(config.device)
                loaded["checkpoint"] = read_checkpoint(out / CHECKPOINT, config, device)
                return None, False
            if resume and not quiet:  # a mistyped --out would otherwise start without a word
                print(f"rigl train: nothing to resume in {str(out)!r} (no {CHECKPOINT}): a "
                      "new run starts there", file=sys.stderr)  # fmt: skip
            return None, True

        done, fresh = main_first(env, prepare)
        if done is not None:
            return done
        return _train(config, env, fresh, loaded, callbacks=callbacks, quiet=quiet, argv=argv)


def _train(
    config: ExperimentConfig,
    env: DistEnv,
    fresh: bool,
    loaded: dict[str, Any],
    *,
    callbacks: Sequence[Any],
    quiet: bool,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    """Build the run in its prepared folder, start or resume it, train it to the end."""
    out = Path(config.out)
    run = builders.build(config, out, extra_callbacks=callbacks, env=env, data=loaded.get("data"))
    kill_point("run-built")
    if fresh:
        if env.is_main:
            config.save(out / "config.yaml")
            info = {**provenance(argv), **run.describe(), "world_size": env.world_size}
            write_json(out / "run.json", info)
    else:
        state = loaded.get("checkpoint") or read_checkpoint(out / CHECKPOINT, config, run.device)
        try:
            load_checkpoint(run, state)  # every rank reads the checkpoint rank 0 checked
        except ConfigError as exc:
            same_on_every_rank(exc)  # the same file on every rank: the same error
            raise
        if env.is_main:
            info = read_json(out / "run.json")
            resumed = {"command": provenance(argv)["command"], "world_size": env.world_size}
            info.setdefault("resumed", []).append(resumed)
            write_json(out / "run.json", info)
    builders.distribute(run)  # DDP, after the checkpoint is loaded
    progress = builders.progress_bar(run, quiet or not env.is_main)
    try:
        while run.epoch < run.epochs:
            train_one_epoch(run, progress)
            end_epoch(run)
    finally:
        if progress is not None:
            progress.close()
    return finish(run, quiet)


def finish(run: Run, quiet: bool) -> dict[str, Any]:
    env = run.env
    save_checkpoint(run)
    run.close_callbacks()
    cpu_time = cpu_time_of_all_ranks(run)
    final = {
        **run.describe(),
        **measures.final_numbers(run),
        "wall_time_s": run.elapsed(),
        "cpu_time_s": cpu_time,
    }
    if env.is_main:
        write_json(run.out / FINAL, final)  # written last: its presence marks a finished run
        if not quiet:
            print(
                f"{run.config.method} sparsity {run.config.sparsity:g}: test accuracy "
                f"{100 * final['test_accuracy']:.2f}%, {final['wall_time_s']:.1f} s -> {run.out}",
                file=sys.stderr,
            )
    distributed.barrier()  # the files exist before any rank goes on
    return final


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rigl.experiments.flags import add_config_flags

    parser.description = (
        "Train one sparse model. The config is --config, else (with --resume) the run's "
        "own config.yaml, else the tuned config of --dataset (configs/<name>.yaml, as the "
        "presets use; generic defaults for a dataset without one); flags override it."
    )
    parser.add_argument("--config", help="YAML or JSON config file")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    add_config_flags(parser)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    from dataclasses import fields

    from rigl.experiments.sweeps.sweep import tuned_base

    overrides = {f.name: getattr(args, f.name) for f in fields(ExperimentConfig) if f.name in args}
    path = args.config
    if path is None and args.resume and "out" in overrides:
        saved = Path(overrides["out"]) / "config.yaml"
        path = saved if saved.exists() else None  # resume from the run's own config
    if path is None:
        path = tuned_base(overrides, quiet=args.quiet)
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
