"""Drop and grow under a group pattern (N:M, constant fan-in): pure functions.

The flat positions split into ``G`` equal contiguous groups of ``size`` (N:M: ``M``
consecutive inputs of a row; fan-in: a row), and every group holds the same number ``a``
of active weights, so the active weights in flat order form a ``(G, a)`` table. Choices
within a group are a top-k per row of a ``(G, size)`` score table; ties go to the larger
priority, drawn from the update's generator for every entry (drop first, then the grow
scores row block by row block: torch's CPU generator is split-consistent, so the draws do
not depend on how the rows are blocked, and both storages choose identically).

Counts per update (``n`` = the method's drop count, ``floor(fraction * n_active)``):

- fan-in: every row drops its ``n // rows`` smallest and grows as many (the same number
  dropped and grown in every row, as in SRigL);
- N:M: the ``n`` smallest drop scores of the whole layer go, and every group then regrows
  as many as it lost, from its own free positions (the just-dropped included), so the
  drop is as global as unstructured RigL's and every group ends with exactly N. (Equal
  per-group counts would round ``fraction * N`` down to 0 for 2:4 at the usual 0.3.)

Sampled growth (RigL's ``grow_candidates``, :func:`grow_sampled_in_groups`) keeps these
counts and reads the grow score only at candidates drawn within each group that grows:
every row (fan-in), or the groups that lost weights (N:M), each drawing its share of the
layer's ``n_candidates`` in proportion to what it regrows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rigl.patterns import Pattern
from rigl.rewiring import Grid, Rewiring, RowScores, check_finite
from rigl.topology import TieBreak, random_subsets

# The grow score at given flat positions only (RigL: |gradient_at(flat)|).
ScoresAt = Callable[[Tensor], Tensor]


def group_size(pattern: Pattern, cols: int) -> int:
    return cols if pattern.kind == "fanin" else pattern.m


def segment_topk(score: Tensor, counts: Tensor | int, priority: Tensor) -> Tensor:
    """Bool ``(G, S)``: True at the ``counts[g]`` largest entries of each row ``g`` of
    ``score``, ties to the larger ``priority`` (two stable sorts: by priority, then score)."""
    by_priority = torch.argsort(priority, dim=1, descending=True, stable=True)
    by_score = torch.argsort(score.gather(1, by_priority), dim=1, descending=True, stable=True)
    order = by_priority.gather(1, by_score)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    counts = torch.as_tensor(counts, device=score.device)
    return rank < (counts.unsqueeze(1) if counts.dim() else counts)


def _priority(tie_break: TieBreak, positions: Tensor) -> Tensor:
    """Priorities of the entries at flat ``positions`` (any shape): looked up in a tensor,
    or one draw each, in order, from the generator."""
    if isinstance(tie_break, Tensor):
        return tie_break[positions]
    return torch.rand(positions.shape, generator=tie_break).to(positions.device)


def _table(active: Tensor, grid: Grid) -> tuple[int, int]:
    """(groups G, active per group a); a ValueError if the groups do not hold equal counts."""
    groups = grid.numel // group_size(grid.pattern, grid.cols)
    if active.numel() % groups:
        raise ValueError(
            f"{grid.name}: {active.numel()} active weights do not fill {groups} groups equally"
        )
    return groups, active.numel() // groups


def drop_in_groups(
    active: Tensor, score: Tensor, n_update: int, grid: Grid, tie_break: TieBreak
) -> Tensor:
    """Keep mask over the sorted ``active`` after every group dropped ``n_update // G`` of
    its smallest ``score`` (fan-in; N:M drops globally, :func:`rigl.selection.drop`)."""
    groups, per_group = _table(active, grid)
    n_drop = min(n_update // groups, per_group)
    shape = (groups, per_group)
    drops = segment_topk(-score.reshape(shape), n_drop, _priority(tie_break, active.reshape(shape)))
    return ~drops.reshape(-1)


def grow_in_groups(
    grow: RowScores, grid: Grid, active: Tensor, keep: Tensor, tie_break: TieBreak
) -> Tensor:
    """Flat positions grown: each group regrows what it lost to ``keep``, from its positions
    not kept, read row block by row block (``grid.block_rows``)."""
    groups, per_group = _table(active, grid)
    lost = per_group - keep.reshape(groups, per_group).sum(1)
    size = group_size(grid.pattern, grid.cols)
    kept = active[keep]
    step = grid.rows if grid.block_rows is None else max(1, grid.block_rows)
    grown = []
    for r0 in range(0, grid.rows, step):
        r1 = min(grid.rows, r0 + step)
        lo, hi = r0 * grid.cols, r1 * grid.cols
        g0, g1 = lo // size, hi // size
        positions = torch.arange(lo, hi, device=kept.device).reshape(g1 - g0, size)
        priority = _priority(tie_break, positions)  # drawn for every block: the same stream
        if not bool(lost[g0:g1].any()):  # however the rows are blocked
            continue  # nothing to grow here: no scores read
        score = grow(r0, r1).reshape(-1)
        check_finite(score, grid.name)
        a, b = torch.searchsorted(kept, torch.tensor([lo, hi], device=kept.device)).tolist()
        here = kept[a:b] - lo
        score = score.index_fill(0, here, -torch.inf).reshape(g1 - g0, size)
        chosen = segment_topk(score, lost[g0:g1], priority)
        grown.append(positions[chosen])
    return torch.cat(grown) if grown else active[:0]


def prune_groups(
    active: Tensor, score: Tensor, n_keep: int, grid: Grid, tie_break: TieBreak
) -> Rewiring:
    """Keep the same number in every group, ``ceil(n_keep / G)``, the largest ``score``."""
    groups, per_group = _table(active, grid)
    per_keep = min(-(-n_keep // groups), per_group)
    shape = (groups, per_group)
    keep = segment_topk(score.reshape(shape), per_keep, _priority(tie_break, active.reshape(shape)))
    return Rewiring(keep.reshape(-1), active[:0])


def grow_sampled_in_groups(
    scores_at: ScoresAt,
    grid: Grid,
    active: Tensor,
    keep: Tensor,
    n_candidates: int,
    generator: torch.Generator,
) -> Tensor:
    """Flat positions grown: each group regrows what it lost to ``keep``, the best by
    ``scores_at`` among candidates drawn uniformly from its positions not kept (the
    just-dropped included). A group that regrows ``l`` of the ``n`` lost in all draws
    ``max(l, ceil(n_candidates l / n))`` candidates, all of its free positions if it has
    no more. Draws from ``generator``: the candidates, then a priority per candidate."""
    groups, per_group = _table(active, grid)
    lost = per_group - keep.reshape(groups, per_group).sum(1)
    n_lost = int(lost.sum())
    if n_lost == 0:
        return active[:0]
    if grid.pattern.kind == "fanin":
        return _grow_sampled_rows(scores_at, grid, active[keep], lost, n_candidates, generator)
    losing = lost.nonzero().squeeze(1)
    m, regrow = grid.pattern.m, lost[losing]
    positions = losing.unsqueeze(1) * m + torch.arange(m, device=active.device)  # (L, M)
    is_kept = torch.isin(positions, active[keep])
    share = torch.maximum(regrow, -(-n_candidates * regrow // n_lost))
    n_cand = torch.minimum(share, m - per_group + regrow)  # at most the group's free ones
    keys = torch.rand(positions.shape, generator=generator).to(positions.device)
    candidate = segment_topk(keys.masked_fill(is_kept, -1.0), n_cand, keys)
    values = _read(scores_at, positions[candidate], grid.name)
    score = torch.full(positions.shape, -torch.inf, dtype=values.dtype, device=values.device)
    score[candidate] = values
    priority = torch.rand(positions.shape, generator=generator).to(positions.device)
    return positions[segment_topk(score, regrow, priority)]


def _grow_sampled_rows(
    scores_at: ScoresAt,
    grid: Grid,
    kept: Tensor,
    lost: Tensor,
    n_candidates: int,
    generator: torch.Generator,
) -> Tensor:
    """Fan-in's sampled growth: every row lost the same ``d`` (the drop of
    :func:`drop_in_groups`) and draws ``c = max(d, ceil(n_candidates / rows))`` of its
    free columns (``kept``: the sorted kept positions, the same number per row)."""
    rows, cols = grid.rows, grid.cols
    d = int(lost[0])
    if bool((lost != d).any()):
        raise ValueError(f"{grid.name}: fan-in rows lost different numbers of weights")
    kept_cols = (kept % cols).reshape(rows, kept.numel() // rows)  # sorted within a row
    n_free = cols - kept_cols.shape[1]
    c = min(n_free, max(d, -(-n_candidates // rows)))
    ranks = random_subsets(rows, n_free, c, generator).to(kept.device)
    # the j-th free column of a row is j plus the number of kept columns at or before it:
    # with kept columns k_0 < k_1 < ..., the number of i with k_i - i <= j
    shifted = kept_cols - torch.arange(kept_cols.shape[1], device=kept.device)
    col = ranks + torch.searchsorted(shifted.contiguous(), ranks, right=True)
    flat = torch.arange(rows, device=kept.device).unsqueeze(1) * cols + col  # (rows, c)
    score = _read(scores_at, flat.reshape(-1), grid.name).reshape(rows, c)
    priority = torch.rand((rows, c), generator=generator).to(flat.device)
    return flat[segment_topk(score, d, priority)]


def _read(scores_at: ScoresAt, flat: Tensor, name: str) -> Tensor:
    score = scores_at(flat)
    check_finite(score, name)
    return score
