"""What a data-parallel run (torchrun) needs beyond DDP: sums over the ranks, a config
that splits over them, and errors raised alike on every rank instead of a hang."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rigl.config import ConfigError
from rigl.distributed import DistEnv
from rigl.experiments.config import ExperimentConfig


def sum_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Element-wise sums over the ranks (one all-reduce; the values themselves in one process)."""
    if not env.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


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
