"""Golden tables for rigl.selection: drop, grow, prune and rewire on hand-made tiny tensors."""

from __future__ import annotations

import pytest
import torch

from rigl import selection
from rigl.rewiring import Grid, NonFiniteScore, Rewiring

T, F = True, False
# Flat scores of a 2 x 4 weight, shared by several tables below.
GROW = torch.tensor([0.0, 0.3, 0.9, 0.1, 0.7, 5.0, 0.2, 0.6])


def rows_of(flat: torch.Tensor, cols: int):
    return lambda r0, r1: flat[r0 * cols : r1 * cols]


def test_drop_removes_the_smallest_and_breaks_ties_by_priority_of_the_position():
    score = torch.tensor([0.5, 0.1, 0.3, 0.1])  # active weights at flat 0, 2, 5, 7
    positions = torch.tensor([0, 2, 5, 7])
    priority = torch.zeros(8)
    priority[7] = 1.0  # of the two tied at 0.1, position 7 has the larger priority: it goes
    keep = selection.drop(score, 1, priority, positions)
    assert keep.tolist() == [T, T, T, F]
    priority[2] = 2.0
    assert selection.drop(score, 1, priority, positions).tolist() == [T, F, T, T]
    assert selection.drop(score, 3, priority, positions).tolist() == [T, F, F, F]
    assert selection.drop(score, 0, priority, positions).tolist() == [T, T, T, T]


@pytest.mark.parametrize("block_rows", [None, 1, 2])  # one dense read; row by row; both rows
def test_grow_picks_the_largest_outside_the_kept_with_ties_by_priority(block_rows):
    score = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.0, 0.5])
    kept = torch.tensor([0, 5])  # 0.9 and 0.8 are kept: never grown
    priority = torch.tensor([0, 0, 0.1, 0.9, 0, 0, 0, 0.5])  # 0.5 ties at 2, 3, 7
    grid = Grid(2, 4, block_rows=block_rows)
    grown = selection.grow_topk(rows_of(score, 4), grid, kept, 2, priority)
    assert sorted(grown.tolist()) == [3, 7]
    grown = selection.grow_topk(rows_of(score, 4), grid, kept, 4, priority)
    assert sorted(grown.tolist()) == [2, 3, 4, 7]  # the three 0.5 and 0.2 at flat 4


def test_rewire_drops_by_drop_score_and_may_grow_a_just_dropped_weight_again():
    active = torch.tensor([0, 2, 5, 7])
    drop = torch.tensor([0.4, 0.1, 0.3, 0.2])  # drop 0.1 (flat 2) and 0.2 (flat 7)
    plan = selection.rewire(active, drop, rows_of(GROW, 4), Grid(2, 4), 2, torch.zeros(8))
    assert plan.keep.tolist() == [T, F, T, F]
    # outside the kept {0, 5}: 0.9 at 2 (just dropped: stays) and 0.7 at 4
    assert sorted(plan.grown.tolist()) == [2, 4]
    mask = torch.zeros(8, dtype=torch.bool)
    mask[active] = True
    assert selection.apply(mask, active, plan).nonzero().flatten().tolist() == [0, 2, 4, 5]


def test_rewire_in_row_blocks_keeps_each_blocks_count():
    active = torch.tensor([0, 1, 4, 6])
    drop = torch.tensor([0.5, 0.1, 0.2, 0.9])
    grow = torch.tensor([9.0, 1, 3, 2, 0.5, 0.4, 7, 0.1])
    # whole: drop flat 1 and 4; grow 3 (flat 2) and 2 (flat 3): row 0 ends with 3, row 1 with 1
    whole = selection.rewire(active, drop, rows_of(grow, 4), Grid(2, 4), 2, torch.zeros(8))
    assert whole.keep.tolist() == [T, F, F, T]
    assert sorted(whole.grown.tolist()) == [2, 3]
    # two blocks (a row each): one drop and one grow per row; row 1 grows 0.5 at flat 4 again
    blocks = selection.rewire(active, drop, rows_of(grow, 4), Grid(2, 4, 2), 2, torch.zeros(8))
    assert blocks.keep.tolist() == [T, F, F, T]
    assert blocks.grown.tolist() == [2, 4]


def test_prune_keeps_the_largest_and_grows_nothing():
    active = torch.tensor([1, 3, 4, 6])
    plan = selection.prune(
        active, torch.tensor([0.3, 0.9, 0.1, 0.5]), 2, Grid(2, 4), torch.zeros(8)
    )
    assert plan.keep.tolist() == [F, T, F, T]
    assert plan.grown.numel() == 0
    # two row blocks: one kept in each (row 0: 0.9 at flat 3; row 1: 0.5 at flat 6)
    plan = selection.prune(
        active, torch.tensor([0.3, 0.9, 0.6, 0.5]), 2, Grid(2, 4, 2), torch.zeros(8)
    )
    assert plan.keep.tolist() == [F, T, T, F]


def test_sampled_growth_over_every_free_position_is_exact_growth():
    kept = torch.tensor([0, 5])
    generator = torch.Generator().manual_seed(0)
    grown = selection.grow_sampled(lambda flat: GROW[flat], 8, kept, 2, 6, generator)
    assert sorted(grown.tolist()) == [2, 4]  # 0.9 and 0.7, as the exact scan
    # fewer candidates: the best among those drawn, never a kept position
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        grown = selection.grow_sampled(lambda flat: GROW[flat], 8, kept, 2, 3, g)
        assert grown.numel() == 2 and not set(grown.tolist()) & {0, 5}


def test_rewire_sampled_drops_like_rewire():
    active = torch.tensor([0, 2, 5, 7])
    drop = torch.tensor([0.4, 0.1, 0.3, 0.2])
    plan = selection.rewire_sampled(
        active, drop, lambda flat: GROW[flat], Grid(2, 4), 2, 6, torch.Generator()
    )
    assert plan.keep.tolist() == [T, F, T, F]
    assert sorted(plan.grown.tolist()) == [2, 4]


def test_non_finite_grow_scores_raise_on_both_read_paths():
    score = GROW.clone()
    score[6] = float("nan")
    for block_rows in (None, 1):
        with pytest.raises(NonFiniteScore, match="non-finite scores in fc"):
            selection.grow_topk(
                rows_of(score, 4),
                Grid(2, 4, 1, block_rows, "fc"),
                torch.tensor([0]),
                2,
                torch.zeros(8),
            )


def test_rewiring_checks_its_fields():
    keep, grown = torch.tensor([T, F]), torch.tensor([3])
    assert Rewiring(keep, grown).n_kept == 1
    with pytest.raises(ValueError, match="bool"):
        Rewiring(torch.tensor([1, 0]), grown)
    with pytest.raises(ValueError, match="int64"):
        Rewiring(keep, grown.int())
    with pytest.raises(ValueError, match="grown_values"):
        Rewiring(keep, grown, torch.ones(2))
    assert torch.equal(Rewiring(keep, grown).with_values(torch.ones(1)).grown_values, torch.ones(1))
