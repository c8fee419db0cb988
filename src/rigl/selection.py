"""Which weights a topology update drops and grows: pure functions, whatever the storage.

Inputs are what every storage provides (:class:`rigl.seam.SparseStorage`): the sorted flat
positions of the active weights, a drop score per active weight in that order, and grow
scores by row block (:data:`rigl.rewiring.RowScores`) or at chosen positions. The answer is
a :class:`rigl.rewiring.Rewiring`. Ties are broken as in :mod:`rigl.topology` (a priority
tensor over flat positions, or draws from a seeded generator for the tied entries only, in
flat order), so the choice is a function of the scores and the seed alone: identical on
both storages, on every data-parallel worker and after a resume.

A weight of several row blocks (:attr:`rigl.rewiring.Grid.blocks`) is updated block by
block, with ``split_evenly(n, blocks)`` drops and grows: every block keeps its count.

Under a structured pattern (:attr:`rigl.rewiring.Grid.pattern`): N:M and fan-in choose
within their groups (:mod:`rigl.structured`); a block pattern pools the scores over each
R x C tile (the sum), selects on the tile grid as if unstructured, and expands the chosen
tiles back to their weights. A priority tensor is then over tile ids. Sampled growth
(:func:`rewire_sampled`) follows the same patterns.

(About 320 lines: the exact and the sampled update under every pattern, pruning, and the
flat-mask forms the golden tables use, one dispatch each.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rigl import structured
from rigl.blockwise import blockwise_topk
from rigl.patterns import tile_members, tile_of
from rigl.rewiring import Grid, Rewiring, RowScores, check_finite
from rigl.topology import (
    TieBreak,
    bottomk_keep,
    random_indices_outside,
    split_evenly,
    topk_indices,
)

# The grow step of one block: (kept positions, k, its grid, tie-break, first row) -> the
# k grown positions, local to the block.
_Grow = Callable[[Tensor, int, Grid, TieBreak, int], Tensor]


def drop(score: Tensor, n_drop: int, tie_break: TieBreak, positions: Tensor) -> Tensor:
    """Bool over the entries of ``score`` (one per active weight, flat order): False at the
    ``n_drop`` smallest. ``positions`` are those weights' flat positions, where a priority
    tensor is looked up; a generator draws for tied entries only, in order."""
    if n_drop <= 0:
        return torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    tie = tie_break[positions] if isinstance(tie_break, Tensor) else tie_break
    return bottomk_keep(score, n_drop, tie)


def grow_topk(grow: RowScores, grid: Grid, kept: Tensor, k: int, tie_break: TieBreak) -> Tensor:
    """Flat positions of the ``k`` largest grow scores outside the sorted ``kept``.

    Read in one call when ``grid.block_rows`` is None (one :func:`topk_indices` over every
    position, kept ones at -inf), else block of rows by block of rows in bounded memory
    (:func:`rigl.blockwise.blockwise_topk`); both choose the same positions.
    """
    if grid.block_rows is not None:
        return blockwise_topk(
            grow, grid.rows, grid.cols, kept, k, tie_break, grid.name, grid.block_rows
        )
    score = grow(0, grid.rows).reshape(-1)
    check_finite(score, grid.name)
    return topk_indices(score.index_fill(0, kept, -torch.inf), k, tie_break)


def grow_sampled(
    scores_at: Callable[[Tensor], Tensor],
    numel: int,
    kept: Tensor,
    k: int,
    n_candidates: int,
    generator: torch.Generator,
    name: str = "weight",
) -> Tensor:
    """The ``k`` best by ``scores_at(flat)`` among ``n_candidates`` (at least ``k``) flat
    positions drawn uniformly outside the sorted ``kept`` (the just-dropped included):
    ``O(n_candidates)`` scores instead of a scan of every position (RigL's
    ``grow_candidates`` for layers too large to scan)."""
    free = numel - kept.numel()
    candidates = random_indices_outside(
        numel, min(max(n_candidates, k), free), kept.cpu(), generator
    ).to(kept.device)
    score = scores_at(candidates)
    check_finite(score, name)
    return candidates[topk_indices(score, k, generator)]


def rewire(
    active: Tensor,
    drop_score: Tensor,
    grow: RowScores,
    grid: Grid,
    n_update: int,
    tie_break: TieBreak,
) -> Rewiring:
    """One drop-and-grow update: drop the ``n_update`` active weights of smallest
    ``drop_score`` (one per sorted ``active`` position), grow the ``n_update`` positions of
    largest grow score among every position not kept. Grown and kept are disjoint, so the
    active count is exactly unchanged. Under a pattern, see the module docstring."""
    kind = grid.pattern.kind
    if kind == "block":
        tiles, inverse, pooled, tile_grid = _tiles(active, drop_score, grid)
        pattern = grid.pattern
        plan = rewire(
            tiles,
            pooled,
            _tile_scores(grow, grid),
            tile_grid,
            n_update // (pattern.r * pattern.c),
            tie_break,
        )
        return Rewiring(plan.keep[inverse], tile_members(plan.grown, pattern, grid.cols))
    if kind in ("fanin", "nm"):
        keep = _group_drop(active, drop_score, grid, n_update, tie_break)
        return Rewiring(keep, structured.grow_in_groups(grow, grid, active, keep, tie_break))

    def grow_block(kept: Tensor, k: int, sub: Grid, tie: TieBreak, row0: int) -> Tensor:
        return grow_topk(lambda r0, r1: grow(row0 + r0, row0 + r1), sub, kept, k, tie)

    return _by_blocks(active, drop_score, grid, n_update, tie_break, grow_block)


def rewire_sampled(
    active: Tensor,
    drop_score: Tensor,
    scores_at: Callable[[Tensor], Tensor],
    grid: Grid,
    n_update: int,
    n_candidates: int,
    generator: torch.Generator,
) -> Rewiring:
    """:func:`rewire` with growth from sampled candidates: the drop is :func:`rewire`'s,
    and the grow score is read only at the candidates (``scores_at(flat)``). Unstructured:
    ``n_candidates`` drawn per row block (:func:`grow_sampled`). Fan-in and N:M: drawn
    within each row / each group that lost weights, the counts kept
    (:func:`rigl.structured.grow_sampled_in_groups`). Blocks: ``ceil(n_candidates / (R C))``
    free tiles, each scored by the sum over its weights. See :func:`samples_growth` for
    when this saves over the exact scan."""
    kind = grid.pattern.kind
    if kind == "block":
        pattern, size = grid.pattern, grid.pattern.r * grid.pattern.c
        tiles, inverse, pooled, tile_grid = _tiles(active, drop_score, grid)

        def tile_scores(ids: Tensor) -> Tensor:
            return scores_at(tile_members(ids, pattern, grid.cols)).reshape(-1, size).sum(1)

        plan = rewire_sampled(
            tiles, pooled, tile_scores, tile_grid, n_update // size, -(-n_candidates // size),
            generator,
        )  # fmt: skip
        return Rewiring(plan.keep[inverse], tile_members(plan.grown, pattern, grid.cols))
    if kind in ("fanin", "nm"):
        keep = _group_drop(active, drop_score, grid, n_update, generator)
        grown = structured.grow_sampled_in_groups(
            scores_at, grid, active, keep, n_candidates, generator
        )
        return Rewiring(keep, grown)

    def grow_block(kept: Tensor, k: int, sub: Grid, tie: TieBreak, row0: int) -> Tensor:
        offset = row0 * sub.cols
        return grow_sampled(
            lambda flat: scores_at(flat + offset), sub.numel, kept, k, n_candidates, tie, sub.name
        )

    return _by_blocks(active, drop_score, grid, n_update, generator, grow_block)


def prune(active: Tensor, score: Tensor, n_keep: int, grid: Grid, tie_break: TieBreak) -> Rewiring:
    """Keep the ``n_keep`` active weights of largest ``score`` (one per sorted ``active``
    position); pruning never grows. In row blocks: ``split_evenly(n_keep, blocks)`` each.
    Under a pattern the count is rounded up to what it holds: ``ceil(n_keep / G)`` in each
    of the G groups, or ``ceil(n_keep / (R C))`` whole tiles."""
    kind = grid.pattern.kind
    if kind == "block":
        tiles, inverse, pooled, tile_grid = _tiles(active, score, grid)
        size = grid.pattern.r * grid.pattern.c
        plan = prune(tiles, pooled, -(-n_keep // size), tile_grid, tie_break)
        return Rewiring(plan.keep[inverse], active[:0])
    if kind in ("fanin", "nm"):
        return structured.prune_groups(active, score, n_keep, grid, tie_break)
    keeps = []
    for part, n_b in zip(_parts(active, grid), split_evenly(n_keep, grid.blocks), strict=True):
        local, lo, hi, tie, _ = _block(active, grid, tie_break, part)
        keeps.append(drop(score[lo:hi], local.numel() - n_b, tie, local))
    return Rewiring(torch.cat(keeps), torch.zeros(0, dtype=torch.int64, device=active.device))


def samples_growth(grid: Grid, n_active: int, n_update: int, n_candidates: int) -> bool:
    """Whether :func:`rewire_sampled` saves over the exact scan for a weight of ``n_active``
    that updates ``n_update`` with ``n_candidates``: something grows, and the candidates
    are at most half of the positions they are drawn from (with more, the exact scan costs
    about as much and is exact). Those positions: the layer's not kept (unstructured,
    and N:M, whose losing groups are known only after the drop), each row's (fan-in:
    ``n_update // rows`` regrown per row), free tiles (blocks)."""
    pattern = grid.pattern
    if pattern.kind == "fanin":
        lost = n_update // grid.rows
        per_row = -(-n_candidates // grid.rows)
        return lost > 0 and 2 * max(lost, per_row) <= grid.cols - n_active // grid.rows + lost
    size = pattern.r * pattern.c if pattern.kind == "block" else 1
    n_update, n_candidates = n_update // size, -(-n_candidates // size)
    return n_update > 0 and 2 * n_candidates <= (grid.numel - n_active) // size + n_update


def _group_drop(
    active: Tensor, drop_score: Tensor, grid: Grid, n_update: int, tie_break: TieBreak
) -> Tensor:
    """Keep mask of a fan-in or N:M drop: N:M drops globally (the groups that lost
    regrow), fan-in the same number in every row."""
    if grid.pattern.kind == "nm":
        return drop(drop_score, min(n_update, active.numel()), tie_break, active)
    return structured.drop_in_groups(active, drop_score, n_update, grid, tie_break)


def _tiles(active: Tensor, score: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor, Grid]:
    """The active tiles (sorted ids), each active weight's index among them, the summed
    ``score`` per tile, and the tile grid (grow scores read ``block_rows // R`` tile rows
    at a time)."""
    pattern = grid.pattern
    tiles, inverse = torch.unique(tile_of(active, pattern, grid.cols), return_inverse=True)
    pooled = torch.zeros(tiles.numel(), dtype=score.dtype, device=score.device)
    pooled.index_add_(0, inverse, score)
    block_rows = None if grid.block_rows is None else max(1, grid.block_rows // pattern.r)
    tile_grid = Grid(
        grid.rows // pattern.r, grid.cols // pattern.c, grid.blocks, block_rows, grid.name
    )
    return tiles, inverse, pooled, tile_grid


def _tile_scores(grow: RowScores, grid: Grid) -> RowScores:
    """Grow scores of tile rows [t0, t1): each tile's sum over its R x C weights."""
    r, c, tile_cols = grid.pattern.r, grid.pattern.c, grid.cols // grid.pattern.c
    return lambda t0, t1: (
        grow(t0 * r, t1 * r).reshape(t1 - t0, r, tile_cols, c).sum((1, 3)).reshape(-1)
    )


def _by_blocks(
    active: Tensor,
    drop_score: Tensor,
    grid: Grid,
    n_update: int,
    tie_break: TieBreak,
    grow_block: _Grow,
) -> Rewiring:
    """Drop then grow in each row block in turn (a generator draws block after block)."""
    keeps, grown = [], []
    for part, n_b in zip(_parts(active, grid), split_evenly(n_update, grid.blocks), strict=True):
        local, lo, hi, tie, sub = _block(active, grid, tie_break, part)
        n_b = min(int(n_b), local.numel())
        keep = drop(drop_score[lo:hi], n_b, tie, local)
        new = grow_block(local[keep], n_b, sub, tie, part * sub.rows) if n_b else local[:0]
        keeps.append(keep)
        grown.append(new + part * sub.numel)
    return Rewiring(torch.cat(keeps), torch.cat(grown))


def _parts(active: Tensor, grid: Grid) -> range:
    if grid.rows % grid.blocks:
        raise ValueError(f"{grid.name}: {grid.rows} rows do not split into {grid.blocks} blocks")
    return range(grid.blocks)


def _block(
    active: Tensor, grid: Grid, tie_break: TieBreak, part: int
) -> tuple[Tensor, int, int, TieBreak, Grid]:
    """Row block ``part``: its active positions (local), their slice [lo, hi) of
    ``active``, its tie-break (a priority tensor is sliced like the positions) and grid."""
    if grid.blocks == 1:
        return active, 0, active.numel(), tie_break, grid
    rows = grid.rows // grid.blocks
    size = rows * grid.cols
    lo, hi = (int(i) for i in torch.searchsorted(active, torch.tensor([part, part + 1]) * size))
    tie = tie_break[part * size : (part + 1) * size] if isinstance(tie_break, Tensor) else tie_break
    sub = Grid(rows, grid.cols, 1, grid.block_rows, grid.name)
    return active[lo:hi] - part * size, lo, hi, tie, sub


# -- the same on flat bool masks (golden tables, small tensors) ---------------------------------
def drop_and_grow(
    mask: Tensor,
    drop_score: Tensor,
    grow_score: Tensor,
    n_update: int,
    tie_break: TieBreak,
    blocks: int = 1,
) -> Tensor:
    """:func:`rewire` on a flat bool ``mask`` with flat ``drop_score`` and ``grow_score``
    over every position: the new flat mask. Drop the ``n_update`` active positions of
    smallest ``drop_score``, then grow the ``n_update`` of largest ``grow_score`` among every
    position not kept (the just-dropped included: one dropped and grown again stays)."""
    active = mask.nonzero().squeeze(1)
    grid = Grid(mask.numel(), 1, blocks)
    plan = rewire(
        active, drop_score[active], lambda r0, r1: grow_score[r0:r1], grid, n_update, tie_break
    )
    return apply(mask, active, plan)


def magnitude_prune(
    mask: Tensor, score: Tensor, n_keep: int, tie_break: TieBreak, blocks: int = 1
) -> Tensor:
    """:func:`prune` on a flat bool ``mask`` with a flat ``score``: the new flat mask."""
    active = mask.nonzero().squeeze(1)
    return apply(
        mask, active, prune(active, score[active], n_keep, Grid(mask.numel(), 1, blocks), tie_break)
    )


def apply(mask: Tensor, active: Tensor, plan: Rewiring) -> Tensor:
    """The flat bool mask after ``plan`` (``active``: the sorted True positions of ``mask``)."""
    new = mask.clone()
    new[active[~plan.keep]] = False
    new[plan.grown] = True
    return new
