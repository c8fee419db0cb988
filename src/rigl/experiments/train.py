"""`rigl train`: one sparse training run from a config, resumable to the same result.

``train(config)`` reads top to bottom: lock and prepare the run folder
(:mod:`~rigl.experiments.runfolder`) -> :func:`build` -> :func:`train_one_epoch` /
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
several machines, ``out`` must be on a shared file system). With ``parallel: fsdp`` the
model is sharded with FSDP2 (:mod:`rigl.fsdp`) and every rank writes its shards of model,
optimizer and masks with DCP (:mod:`~rigl.experiments.sharded_checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rigl import distributed
from rigl.config import ConfigError
from rigl.distributed import DistEnv
from rigl.experiments import builders, measures, runfolder, sharded_checkpoint
from rigl.experiments.builders import Run
from rigl.experiments.checkpoint import load_checkpoint, read_checkpoint
from rigl.experiments.config import ExperimentConfig, load_config
from rigl.experiments.runfolder import CHECKPOINT, FINAL
from rigl.experiments.runio import (
    atomic_torch_save,
    kill_point,
    provenance,
    read_json,
    write_json,
)

EVAL_BATCH = 1024


# -- data order ----------------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The permutation of the ``n`` training examples used in ``epoch``: a function of
    ``(seed, epoch)`` only, so it can be recomputed when resuming mid-epoch."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(n, generator=generator)


def iterate_batches(
    dataset: Any,
    order: Tensor,
    batch_size: int,
    start: int,
    stop: int,
    env: DistEnv | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``start .. stop-1`` of ``dataset`` in ``order``; with a distributed ``env``,
    this rank's shard of each (the global batches are the same on every rank)."""
    tensors = getattr(dataset, "tensors", None)
    for b in range(start, stop):
        index = order[b * batch_size : (b + 1) * batch_size]
        if env is not None and env.enabled:
            index = distributed.shard(index, env)
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


def sum_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Element-wise sums over the ranks (one all-reduce; the values themselves in one process)."""
    if not env.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


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


# -- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(run: Run) -> None:
    """Everything needed to continue bit-identically, written atomically (by rank 0:
    every rank holds the same state)."""
    cpu_time = cpu_time_of_all_ranks(run)
    if builders.sharded(run.config, run.env):  # FSDP: every rank writes its shards
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


# -- the whole run -------------------------------------------------------------------------
def check_data_parallel(config: ExperimentConfig, env: DistEnv, n_train: int | None = None) -> None:
    """What a torchrun job needs: a global batch (and a last, partial one in an epoch) that
    splits over the ranks."""
    if not env.enabled:
        return
    n = env.world_size
    if config.batch_size % n:
        fixed = (config.batch_size // n + 1) * n
        raise same_on_every_rank(
            ConfigError(
                f"batch_size={config.batch_size} is the global batch and must be divisible "
                f"by the world size ({n} processes): set batch_size to a multiple of {n} "
                f"(e.g. --batch_size {fixed}) or launch a number of processes that divides it"
            )
        )
    rest = n_train % config.batch_size if n_train is not None else 0
    if 0 < rest < n:
        raise same_on_every_rank(
            ConfigError(
                f"batch_size={config.batch_size}: the last batch of each epoch has {rest} "
                f"of the {n_train} training examples, fewer than the world size ({n} "
                "processes); choose a batch_size that leaves no such batch"
            )
        )


def same_on_every_rank(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised alike on every rank (the CLI reports it from rank 0 only)."""
    exc.rigl_every_rank = True  # type: ignore[attr-defined]
    return exc


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (to be sent to the other ranks), else its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def main_first(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the main process while the others wait; then its result, or its
    exception, on every rank (an error found by rank 0 is raised everywhere, not a hang)."""
    if not env.enabled:
        return fn()
    box: list[Any] = [(None, None)]
    if env.is_main:
        try:
            box = [(fn(), None)]
        except Exception as exc:
            same_on_every_rank(exc)
            torch.distributed.broadcast_object_list([(None, _portable(exc))], src=0)
            raise
    torch.distributed.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise same_on_every_rank(error)
    return result


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
    builders.make_device(config.device)  # a clear error before CUDA is touched
    builders.check_packages(config)  # before the run folder is made
    env = distributed.init_from_env(device=config.device)  # no-op in a single process
    check_data_parallel(config, env)
    loaded: dict[str, Any] = {}
    with contextlib.ExitStack() as held:  # rank 0 holds the run folder's lock to the end

        def prepare() -> tuple[dict[str, Any] | None, bool]:  # rank 0; the others wait
            if env.enabled:  # load (and cache) the data before the other ranks read it
                from rigl.experiments.data import load_dataset

                data = load_dataset(config.dataset, root=config.data_root, **config.dataset_options)
                check_data_parallel(config, env, len(data.train))
                loaded["data"] = data
            out = held.enter_context(
                runfolder.open_run(config, resume=resume, overwrite=overwrite)
            ).path
            if (out / FINAL).exists():
                return read_json(out / FINAL), False
            if (out / CHECKPOINT).exists():  # checked before anything is built or cut back
                device = env.device if env.enabled else builders.make_device(config.device)
                loaded["checkpoint"] = read_checkpoint(out / CHECKPOINT, config, device)
                return None, False
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

    from rigl.experiments.sweep import tuned_base

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
