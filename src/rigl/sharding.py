"""Exact top-k and drop-and-grow over a flat vector split among ranks (FSDP2 shards).

A layer sharded with ``fully_shard`` is split by rows (``Shard(0)``): rank ``r`` holds
rows ``[row0_r, row1_r)``, so its entries are one contiguous piece of the layer's flat
order, and the pieces follow each other in rank order. The selection here is the one of
:func:`rigl.selection.drop_and_grow` on the whole layer, bit for bit, without gathering a
dense score:

1. each rank proposes its ``min(k, n_local)`` largest scores; the ranks all-gather these
   candidates (at most ``k`` values per rank) and agree on the global k-th value ``t``;
2. the ranks all-gather their counts of entries ``> t`` and ``== t``; if the two add up to
   ``k`` every such entry is chosen and nothing is drawn (as in one process);
3. otherwise the tied entries, numbered in global flat order (a rank's are numbered after
   those of the ranks before it), get priorities ``rand(n_tied)`` from the update's
   generator, which every rank draws whole: the same numbers one process draws for the
   same tied entries. The ``k - n_above`` largest priorities win, on every rank alike.

The generator advances exactly as in one process (one draw per tie, in the same order),
so later draws of the same update agree too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rigl.guard import UsageError
from rigl.topology import split_evenly

Group = Any  # a torch.distributed ProcessGroup (None: the default group)


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient of an FSDP2 module)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def _gather_ints(values: list[int], group: Group) -> Tensor:
    """(world, len(values)) int64: every rank's ``values``."""
    mine = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out)


def all_finite(local: Tensor, group: Group) -> bool:
    """Whether every rank's ``local`` piece is free of inf/NaN (one all-reduce)."""
    flat = local.detach().reshape(-1)
    ok = bool(torch.isfinite(flat).all()) if flat.numel() else True
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def sum_over(values: list[int], group: Group) -> list[int]:
    """Element-wise sums of integer counts over the ranks."""
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, group=group)
    return [int(v) for v in tensor.tolist()]


def _kth_largest(score: Tensor, k: int, group: Group) -> Tensor:
    """The k-th largest value of the union of every rank's ``score`` (0-d tensor). Sent as
    float64 (exact for every float type), so ranks agree whatever dtype each scored in
    (an empty piece has no dtype of its own)."""
    m = min(k, score.numel())
    local = torch.topk(score, m, sorted=False).values if m else score[:0]
    sizes = _gather_ints([m], group)[:, 0].tolist()
    padded = torch.full((k,), -math.inf, dtype=torch.float64)
    padded[:m] = local
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    candidates = torch.cat([values[:n] for values, n in zip(out, sizes, strict=True)])
    return torch.topk(candidates, k, sorted=False).values.min()


def sharded_topk(score: Tensor, k: int, generator: torch.Generator, group: Group) -> Tensor:
    """Local positions (sorted int64) of this rank's entries among the ``k`` largest of the
    global vector whose rank-ordered pieces are every rank's ``score``; exact ties at the
    k-th value broken as :func:`rigl.topology.topk_indices` breaks them."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    total = sum_over([score.numel()], group)[0]
    if k > total:
        raise ValueError(f"cannot choose {k} of {total} positions")
    threshold = _kth_largest(score, k, group)
    above, tied = score > threshold, score == threshold
    counts = _gather_ints([int(above.count_nonzero()), int(tied.count_nonzero())], group)
    n_above, n_tied = (int(c) for c in counts.sum(0))
    if n_above + n_tied == k:  # no tie to break: nothing is drawn, as in one process
        return (above | tied).nonzero().squeeze(1)
    rank = dist.get_rank(group)
    first = int(counts[:rank, 1].sum())  # tied entries of the ranks before this one
    priority = torch.rand(n_tied, generator=generator)  # the whole draw, on every rank
    best = torch.topk(priority, k - n_above).indices
    mine = best[(best >= first) & (best < first + int(counts[rank, 1]))] - first
    chosen = above.clone()
    chosen[tied.nonzero().squeeze(1)[mine]] = True
    return chosen.nonzero().squeeze(1)


def sharded_drop_and_grow(
    mask: Tensor,
    drop_score: Tensor,
    grow_score: Tensor,
    n_update: int,
    generator: torch.Generator,
    group: Group,
) -> Tensor:
    """This rank's piece of :func:`rigl.selection.drop_and_grow` (``blocks=1``) on the
    global flat vectors whose pieces are every rank's ``mask`` and scores."""
    n_update = min(int(n_update), sum_over([int(mask.count_nonzero())], group)[0])
    keep = mask.clone()
    if n_update == 0:
        return keep
    active = mask.nonzero().squeeze(1)  # the drop ranks the active entries in flat order
    keep[active[sharded_topk(-drop_score[active], n_update, generator, group)]] = False
    candidates = grow_score.masked_fill(keep, -torch.inf)
    keep[sharded_topk(candidates, n_update, generator, group)] = True
    return keep


def per_block(
    fn: Callable[..., Tensor],
    start: int,
    numel: int,
    blocks: int,
    n: int,
    *local: Tensor,
) -> Tensor:
    """``fn(*pieces, n_b)`` for each of ``blocks`` equal contiguous blocks of a global flat
    vector of ``numel`` entries of which this rank holds ``[start, start + len)``: every
    rank calls ``fn`` for every block (with a possibly empty piece), block after block, as
    :func:`rigl.topology._per_block` does in one process; the pieces concatenated."""
    if blocks == 1:
        return fn(*local, n)
    size, length = numel // blocks, local[0].numel()
    parts = []
    for b, n_b in enumerate(split_evenly(int(n), blocks)):
        lo = min(max(b * size - start, 0), length)
        hi = min(max((b + 1) * size - start, 0), length)
        parts.append(fn(*(t[lo:hi] for t in local), n_b))
    return torch.cat(parts)


def check_not_resharded(sparsifier: Any) -> None:
    """Refuse a model whose sparsified parameters were replaced after ``rigl.create``
    (``fully_shard`` after creating the sparsifier)."""
    for weight, target in zip(sparsifier.weights, sparsifier.targets, strict=True):
        param = getattr(weight, "param", None)
        if param is None or target.param is param:
            continue
        raise UsageError(
            f"the parameter {weight.name} was replaced after rigl.create (fully_shard "
            "applied after creating the sparsifier?). Shard first, then create the "
            "optimizer and the sparsifier: fully_shard(...); optimizer = ...(model.parameters()); "
            "rigl.create(method, model, optimizer, ...)"
        )
