"""The order of the training data: a permutation per epoch that a resumed run recomputes,
cut into global batches (and, under torchrun, into each rank's shard of every batch)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rigl import distributed
from rigl.distributed import DistEnv


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
