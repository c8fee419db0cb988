"""Golden tables for drop/grow on hand-made 8-element tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from rigl import topology
from rigl.selection import drop_and_grow, magnitude_prune
from rigl.topology import (
    random_mask,
    topk_indices,
    topk_mask,
    update_generator,
)

T, F = True, False


def test_drop_smallest_magnitudes_grow_largest_scores():
    mask = torch.tensor([T, T, T, T, F, F, F, F])
    magnitude = torch.tensor([0.5, 0.1, 0.9, 0.3, 0, 0, 0, 0])
    grow = torch.tensor([0.0, 5.0, 0.0, 0.0, 1.0, 3.0, 0.2, 2.0])
    priority = torch.zeros(8)
    # drop the two smallest active (positions 1 and 3), keep {0, 2};
    # grow the two best of the rest {1,3,4,5,6,7}: position 1 (5.0, just dropped) and 5 (3.0)
    new = drop_and_grow(mask, magnitude, grow, 2, priority)
    assert new.tolist() == [T, T, T, F, F, T, F, F]
    assert int(new.sum()) == 4


def test_grow_never_picks_a_kept_position():
    mask = torch.tensor([T, T, F, F, F, F, F, F])
    magnitude = torch.tensor([0.9, 0.1, 0, 0, 0, 0, 0, 0])
    grow = torch.tensor([9.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # kept 0 has the top score
    new = drop_and_grow(mask, magnitude, grow, 1, torch.zeros(8))
    assert new.tolist() == [T, F, T, F, F, F, F, F]


def test_ties_are_broken_by_priority():
    score = torch.ones(8)
    priority = torch.tensor([0.1, 0.8, 0.3, 0.9, 0.2, 0.7, 0.4, 0.0])
    assert topk_mask(score, 3, priority).nonzero().flatten().tolist() == [1, 3, 5]


def test_generator_tie_break_is_seeded_and_exact():
    score = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    picks = [
        topk_mask(score, 3, update_generator(seed, 0, 0)).nonzero().flatten().tolist()
        for seed in (0, 0, 1, 2, 3)
    ]
    assert picks[0] == picks[1]  # same seed, same choice
    assert all(p[0] == 0 and len(p) == 3 and 7 not in p for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # the seed decides among the tied


def test_ties_among_active_weights_when_dropping():
    mask = torch.tensor([T, T, T, T, F, F, F, F])
    magnitude = torch.tensor([0.0, 0.0, 0.0, 0.7, 0, 0, 0, 0])  # three tied zeros
    priority = torch.tensor([0.9, 0.1, 0.5, 0.0, 0, 0, 0, 0])
    grow = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0])
    # dropping is a top-k of -|w|: among the tied zeros the larger priorities (0 and 2)
    # are chosen to go; then grow 5 and 4
    new = drop_and_grow(mask, magnitude, grow, 2, priority)
    assert new.tolist() == [F, T, F, T, T, T, F, F]


def test_ties_only_at_the_threshold_use_priority():
    score = torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    priority = torch.tensor([0.0, 0.1, 0.9, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert topk_mask(score, 2, priority).nonzero().flatten().tolist() == [0, 2]


def test_zero_update_keeps_the_mask():
    mask = torch.tensor([T, F, T, F, T, F, T, F])
    new = drop_and_grow(mask, torch.rand(8), torch.rand(8), 0, torch.rand(8))
    assert torch.equal(new, mask)


def test_magnitude_prune_keeps_the_largest_active():
    mask = torch.tensor([T, T, T, T, T, T, F, F])
    score = torch.tensor([0.6, 0.1, 0.5, 0.2, 0.4, 0.3, 9.0, 9.0])
    assert magnitude_prune(mask, score, 3, torch.zeros(8)).nonzero().flatten().tolist() == [0, 2, 4]


def test_random_mask_has_the_exact_count_and_is_seeded():
    a = random_mask(100, 17, update_generator(0, -1, 3))
    b = random_mask(100, 17, update_generator(0, -1, 3))
    c = random_mask(100, 17, update_generator(1, -1, 3))
    assert int(a.sum()) == 17 and torch.equal(a, b) and not torch.equal(a, c)


def _levels(n: int, levels: int | None, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if levels is None:
        return torch.rand(n, generator=g)
    return torch.randint(0, levels, (n,), generator=g).float()  # masses of exact ties


@pytest.mark.parametrize("low_wins", [False, True])
@pytest.mark.parametrize("levels", [None, 7, 1000])
@pytest.mark.parametrize("k", [1, 300, 4000, 10_000, 50_000, 99_999])
def test_sampled_band_gives_the_exact_top_k(monkeypatch, levels, k, low_wins):
    """The banded top-k (a sampled bracket of the k-th value) chooses what the plain
    top-k chooses, ties included, and draws as many tie priorities."""
    score = _levels(100_000, levels, k)
    fast_gen, mask_gen, exact_gen = (update_generator(5, 1, 2) for _ in range(3))
    fast = topk_indices(score, k, fast_gen, low_wins=low_wins)
    mask = topk_mask(score, k, mask_gen, low_wins=low_wins)  # the band as a bool mask
    monkeypatch.setattr(topology, "_PREFILTER_MIN", 10**12)  # force the plain top-k
    exact = topk_indices(score, k, exact_gen, low_wins=low_wins)
    assert fast.numel() == k and sorted(fast.tolist()) == sorted(exact.tolist())
    assert mask.nonzero().squeeze(1).tolist() == sorted(exact.tolist())
    after = torch.rand(3, generator=exact_gen)
    assert torch.equal(torch.rand(3, generator=fast_gen), after)
    assert torch.equal(torch.rand(3, generator=mask_gen), after)


@pytest.mark.parametrize("levels", [None, 7, 1000])
@pytest.mark.parametrize("k", [0, 1, 2, 700, 1500, 1999, 2000])
@pytest.mark.parametrize("priority", [False, True])
def test_bottomk_keep_is_the_exact_complement_of_the_bottom_k(levels, k, priority):
    """From either side (k <= n/2: drop the k smallest; k > n/2: keep the n - k largest with
    the smaller priority winning ties), the same positions, with the same tie draws."""
    n = 2000
    score = _levels(n, levels, k + 11)
    tie = torch.rand(n, generator=torch.Generator().manual_seed(3)) if priority else None
    gen_a, gen_b = update_generator(1, 2, 3), update_generator(1, 2, 3)
    keep = topology.bottomk_keep(score, k, tie if priority else gen_a)
    expected = torch.ones(n, dtype=torch.bool)
    expected[topk_indices(-score, k, tie if priority else gen_b)] = False
    assert torch.equal(keep, expected) and int((~keep).sum()) == k
    assert torch.equal(torch.rand(3, generator=gen_a), torch.rand(3, generator=gen_b))


def test_bottomk_keep_breaks_ties_by_priority_golden():
    """Scores [1, 1, 1, 1, 5, 5] with priorities [.1 .9 .5 .3 .2 .8]: the 5 smallest are the
    four 1s and the 5 of larger priority (position 5, 0.8 > 0.2); dropping 3 of the 1s
    drops the three larger priorities (1, 2, 3) and keeps 0. Both sides give the same."""
    score = torch.tensor([1.0, 1, 1, 1, 5, 5])
    tie = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.8])
    assert topology.bottomk_keep(score, 5, tie).tolist() == [F, F, F, F, T, F]
    assert topology.bottomk_keep(score, 3, tie).tolist() == [T, F, F, F, T, T]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_random_subsets_are_uniform_distinct_and_sorted_in_every_row(k):
    """k distinct sorted values of [0, 5) per row; every one of the C(5, k) subsets about
    equally often over 20,000 rows (2k <= 5 is rejection sampling, 2k > 5 keys every value)."""
    rows, n = 20_000, 5
    draws = topology.random_subsets(rows, n, k, torch.Generator().manual_seed(k))
    assert draws.shape == (rows, k) and draws.dtype == torch.int64
    assert bool((draws[:, 1:] > draws[:, :-1]).all()) and bool(((draws >= 0) & (draws < n)).all())
    codes = (draws * n ** torch.arange(k)).sum(1)  # one code per subset
    counts = torch.unique(codes, return_counts=True)[1]
    assert counts.numel() == math.comb(n, k)
    expected = rows / math.comb(n, k)
    assert bool(((counts - expected).abs() < 6 * expected**0.5 + 1).all()), counts
    again = topology.random_subsets(rows, n, k, torch.Generator().manual_seed(k))
    assert torch.equal(draws, again)


def test_random_subsets_refuse_more_than_there_are():
    with pytest.raises(ValueError, match="cannot choose 4 of 3"):
        topology.random_subsets(2, 3, 4, torch.Generator())
