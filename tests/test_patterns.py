"""Structured patterns: parsing and errors, counts under the distributions, golden tables of
the grouped drop and grow (hand-computed 2:4, fan-in and block updates on tiny tensors)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rigl
from rigl import selection
from rigl.config import SparsityConfig
from rigl.errors import ConfigError
from rigl.patterns import Pattern, fit_counts, initial_positions, parse_pattern, violations
from rigl.rewiring import Grid
from rigl.summary import budget as summary_budget

T, F = True, False


def rows_of(flat, cols):
    return lambda r0, r1: flat[r0 * cols : r1 * cols]


# -- parsing and configuration ------------------------------------------------------------------
def test_patterns_parse_and_print_back():
    assert parse_pattern("2:4") == Pattern("nm", n=2, m=4)
    assert str(parse_pattern(" Block:4x2 ")) == "block:4x2"
    assert str(parse_pattern("fanin")) == "fanin"
    config = SparsityConfig(sparsity=0.5, pattern="2:4")
    assert SparsityConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("3:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("block:0x4", "block sides must be >= 1"),
        ("blocks", "unknown; allowed"),
        (4, "must be a string"),
    ],
)
def test_bad_patterns_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        SparsityConfig(sparsity=0.5, pattern=spec)


def test_nm_fixes_the_sparsity():
    with pytest.raises(ConfigError, match=r"sparsity=0.9 does not fit pattern 2:4.*sparsity=0.5"):
        SparsityConfig(sparsity=0.9, pattern="2:4")
    with pytest.raises(ConfigError, match="custom_sparsity"):
        SparsityConfig(sparsity=0.75, pattern="1:4", custom_sparsity={"fc.weight": 0.5})
    SparsityConfig(sparsity=0.875, pattern="1:8", custom_sparsity={"fc.weight": 0.0})


def test_a_layer_that_cannot_hold_the_pattern_is_left_unstructured_with_a_warning():
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"pattern 1:8: 2.weight is left unstructured \(12 inputs"):
        sp = rigl.create("static", model, opt, sparsity=0.875, pattern="1:8")
    assert [str(w.pattern) for w in sp.weights] == ["1:8", "unstructured"]
    assert sp.target_counts == [24, 17]  # 1/8 of 192; the ERK share of 120 weights
    assert "cannot hold pattern 1:8" in sp.summary_table()
    sp.check()
    sp.remove()
    with pytest.warns(UserWarning, match=r"block:4x4: 2.weight is left unstructured \(10 x 12"):
        rigl.create("static", model, opt, sparsity=0.8, pattern="block:4x4").remove()
    sp = rigl.create("static", model, opt, sparsity=0.8, pattern="block:4x4", last_layer_dense=True)
    assert sp.target_counts == [2 * 16, 120]  # 0.2 * 192 = 38.4: two 4x4 tiles nearest


# -- counts --------------------------------------------------------------------------------------
def test_fit_counts_rounds_to_units_and_matches_the_budget_as_closely_as_units_allow():
    shapes = [(10, 20, 1), (30, 10, 1)]  # fan-in units: 10 and 30 weights
    assert fit_counts(Pattern("fanin"), [41, 62], shapes, 103) == [
        40,
        60,
    ]  # 100: next unit overshoots more
    assert fit_counts(Pattern("fanin"), [44, 54], shapes, 98) == [40, 60]
    assert fit_counts(Pattern("fanin"), [0, 1], shapes, 1) == [10, 30]  # never an empty layer
    assert fit_counts(Pattern("nm", n=1, m=4), [7, 7], shapes, 14) == [50, 75]


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("pattern", ["fanin", "block:2x4"])
def test_distributions_give_counts_the_pattern_holds(distribution, pattern):
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )
    dens = rigl.layer_densities(model, 0.8, distribution, pattern=pattern)
    plain = rigl.layer_densities(model, 0.8, distribution)
    numel = {"0.weight": 512, "2.weight": 768, "4.weight": 192}
    rows = {"0.weight": 32, "2.weight": 24, "4.weight": 8}
    unit = (lambda n: rows[n]) if pattern == "fanin" else (lambda n: 8)
    for name, d in dens.items():
        count = round(d * numel[name])
        assert count % unit(name) == 0 and count > 0
        assert abs(count - plain[name] * numel[name]) <= unit(name) + sum(rows.values())
    total = sum(round(d * numel[n]) for n, d in dens.items())
    budget = sum(round(d * numel[n]) for n, d in plain.items())
    assert abs(total - budget) <= max(rows.values())


def test_initial_positions_hold_the_pattern():
    g = torch.Generator().manual_seed(0)
    for pattern, n in (
        (Pattern("fanin"), 48),
        (Pattern("nm", n=1, m=4), 24),
        (Pattern("block", r=2, c=4), 32),
    ):
        flat = initial_positions(pattern, 8, 12, n, g)
        assert flat.numel() == n and flat.unique().numel() == n
        assert violations(pattern, flat, 8, 12) == []
    broken = torch.tensor([0, 1, 2, 13])  # row 0 holds 3, row 1 one
    assert "between 1 and 3 active per row" in violations(Pattern("fanin"), broken, 2, 12)[0]


# -- golden tables -------------------------------------------------------------------------------
def test_two_four_drops_globally_and_regrows_in_the_groups_that_lost():
    # a 1 x 8 weight = two groups of 4; active 0, 1 | 4, 6
    active = torch.tensor([0, 1, 4, 6])
    drop = torch.tensor([0.9, 0.1, 0.2, 0.8])  # the two smallest: flat 1 (group 0), 4 (group 1)
    grow = torch.tensor([5.0, 0.3, 0.7, 0.2, 0.6, 0.1, 9.0, 0.4])
    grid = Grid(1, 8, pattern=Pattern("nm", n=2, m=4))
    plan = selection.rewire(active, drop, rows_of(grow, 8), grid, 2, torch.zeros(8))
    assert plan.keep.tolist() == [T, F, F, T]
    # group 0 regrows 1 of {1, 2, 3}: 0.7 at flat 2; group 1 of {4, 5, 7}: 0.6 at 4 (again)
    assert plan.grown.tolist() == [2, 4]
    # only one drop, in group 1 (flat 4): group 0 keeps both and grows nothing
    plan = selection.rewire(
        active, torch.tensor([0.9, 0.5, 0.2, 0.8]), rows_of(grow, 8), grid, 1, torch.zeros(8)
    )
    assert plan.keep.tolist() == [T, T, F, T] and plan.grown.tolist() == [4]


def test_fan_in_drops_and_grows_the_same_number_in_every_row():
    # 2 x 4, two active per row: 0, 3 | 5, 6
    active = torch.tensor([0, 3, 5, 6])
    drop = torch.tensor([0.1, 0.2, 0.05, 0.01])  # globally both smallest are in row 1
    grow = torch.tensor([0.0, 0.4, 0.3, 0.0, 0.9, 0.0, 0.0, 0.8])
    grid = Grid(2, 4, pattern=Pattern("fanin"))
    plan = selection.rewire(active, drop, rows_of(grow, 4), grid, 2, torch.zeros(8))
    assert plan.keep.tolist() == [F, T, T, F]  # one per row: 0.1 in row 0, 0.01 in row 1
    # row 0 grows one of {0, 1, 2}: 0.4 at 1; row 1 one of {4, 6, 7}: 0.9 at 4
    assert plan.grown.tolist() == [1, 4]
    # ties within a row go to the larger priority
    priority = torch.tensor([0, 0, 0, 0, 0, 0.2, 0.1, 0.9])
    flat = torch.zeros(8)
    plan = selection.rewire(active, drop, rows_of(flat, 4), grid, 2, priority)
    assert plan.grown.tolist() == [0, 7]  # row 0: all 0 priority, first; row 1: flat 7


def test_block_pattern_pools_the_scores_over_each_tile():
    # 2 x 4 in 1 x 2 tiles (ids 0..3 = flat {0,1}, {2,3}, {4,5}, {6,7}); active tiles 0 and 3
    pattern = Pattern("block", r=1, c=2)
    active = torch.tensor([0, 1, 6, 7])
    drop = torch.tensor([0.1, 0.2, 0.5, 0.4])  # tile sums 0.3 and 0.9: tile 0 goes
    grow = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.9, 0.0, 0.0, 0.0])  # tile 1: 1.0, tile 2: 0.9
    plan = selection.rewire(
        active, drop, rows_of(grow, 4), Grid(2, 4, pattern=pattern), 2, torch.zeros(4)
    )
    assert plan.keep.tolist() == [F, F, T, T]
    assert plan.grown.tolist() == [2, 3]
    kept = selection.prune(active, drop, 2, Grid(2, 4, pattern=pattern), torch.zeros(4))
    assert kept.keep.tolist() == [F, F, T, T]


def test_grouped_prune_keeps_the_same_number_in_every_group():
    active = torch.arange(8)  # a dense 1 x 8 weight in two groups of 4 (2:4 target)
    score = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.8, 0.7, 0.2, 0.6])
    plan = selection.prune(
        active, score, 4, Grid(1, 8, pattern=Pattern("nm", n=2, m=4)), torch.zeros(8)
    )
    assert plan.keep.nonzero().flatten().tolist() == [1, 3, 4, 5]
    plan = selection.prune(
        active, score, 5, Grid(1, 8, pattern=Pattern("nm", n=2, m=4)), torch.zeros(8)
    )
    assert plan.keep.nonzero().flatten().tolist() == [1, 2, 3, 4, 5, 7]  # ceil(5 / 2) = 3 each


# -- the budget in summary() ---------------------------------------------------------------------
def _tiny_budget(pattern, sparsity, distribution):
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))  # 192 + 120 weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 1:8: the 12-input layer is left unstructured
        sp = rigl.create(
            "static", model, None, sparsity=sparsity, pattern=pattern, distribution=distribution
        )
    return sp, summary_budget(sp.summary())


@pytest.mark.parametrize(
    ("pattern", "sparsity", "distribution", "requested", "targets", "deviation", "pp", "line"),
    [
        # uniform 0.7: 192 - floor(134.4) = 58 and 120 - 84 = 36 requested, 94 in all.
        # fan-in (units of 12 and 10 weights): 60 and 40 are nearest, 100 overshoots by 6;
        # 30 instead of 40 leaves 4 short (closer): 90, 4 / 312 = 1.28 points sparser
        ("fanin", 0.7, "uniform", [58, 36], [60, 30], -4, 1.282,
         "budget: requested sparsity 0.6987 (94 active), achieved 0.7115 (90 active): "
         "-4 weights, +1.28 pp"),
        # block 2x4 (units of 8): 56 and 32 (round(4.5) = 4), 88 is 6 short; a tile more in
        # the layer furthest below its ideal (the second: 4 against 2 weights): 96
        ("block:2x4", 0.7, "uniform", [58, 36], [56, 40], 2, -0.641,
         "budget: requested sparsity 0.6987 (94 active), achieved 0.6923 (96 active): "
         "+2 weights, -0.64 pp"),
        # ERK 0.875: budget 24 + 15 = 39, eps = 39 / (28 + 22), shares 21.84 and 17.16 ->
        # 22 and 17; 1:8 gives the first layer 192 / 8 = 24, the second (12 inputs) keeps 17
        ("1:8", 0.875, "erk", [22, 17], [24, 17], 2, -0.641,
         "budget: requested sparsity 0.8750 (39 active), achieved 0.8686 (41 active): "
         "+2 weights, -0.64 pp"),
        ("unstructured", 0.7, "uniform", [58, 36], [58, 36], 0, 0.0,
         "budget: requested sparsity 0.6987 (94 active), achieved 0.6987 (94 active): "
         "+0 weights, +0.00 pp"),
    ],
)  # fmt: skip
def test_summary_shows_how_far_the_pattern_moved_the_budget(
    pattern, sparsity, distribution, requested, targets, deviation, pp, line
):
    sp, budget = _tiny_budget(pattern, sparsity, distribution)
    assert sp.requested_counts == requested and sp.target_counts == targets
    assert [r.requested for r in sp.summary()] == requested
    assert (budget.requested, budget.active, budget.total) == (sum(requested), sum(targets), 312)
    assert budget.deviation == deviation
    assert budget.deviation_pp == pytest.approx(pp, abs=1e-3)
    assert budget.requested_sparsity == pytest.approx(1 - sum(requested) / 312)
    assert sp.summary_table().splitlines()[-1] == line
    sp.remove()


def test_a_summary_row_without_its_request_has_no_budget():
    row = rigl.LayerSummary("fc.weight", (4, 3), 0.5, 6, 12)  # built by hand, positionally
    assert row.requested is None and summary_budget([row]) is None
    assert summary_budget([]) is None


# -- sampled growth (RigL's grow_candidates) under patterns --------------------------------------
def _recording(grow):
    """scores_at over a flat score table, recording every position it is asked for."""
    asked = []

    def scores_at(flat):
        asked.append(flat.clone())
        return grow[flat]

    return scores_at, asked


def test_sampled_fan_in_reads_only_each_rows_candidates_and_grows_the_best():
    # 2 x 6, three active per row: 0, 2, 4 | 7, 9, 11 (columns 1, 3, 5)
    active = torch.tensor([0, 2, 4, 7, 9, 11])
    drop = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.8, 0.7])  # one per row: flat 2 and flat 7
    grow = torch.tensor([0.0, 0.3, 0.6, 0.4, 0.0, 0.1, 0.0, 0.9, 0.2, 0.0, 0.5, 0.0])
    grid = Grid(2, 6, pattern=Pattern("fanin"))
    # 8 candidates = 4 per row = every free column: row 0 keeps {0, 4}, free {1, 2, 3, 5};
    # row 1 keeps {3, 5}, free {0, 1, 2, 4} (flat 6, 7, 8, 10), the just-dropped included
    scores_at, asked = _recording(grow)
    plan = selection.rewire_sampled(active, drop, scores_at, grid, 2, 8, torch.Generator())
    assert plan.keep.tolist() == [T, F, T, F, T, T]
    assert torch.cat(asked).tolist() == [1, 2, 3, 5, 6, 7, 8, 10]
    assert plan.grown.tolist() == [2, 7]  # 0.6 (dropped and grown again), 0.9 (the same)
    # 2 candidates per row (half the free columns): the best of those drawn, in each row
    for seed in range(10):
        scores_at, asked = _recording(grow)
        plan = selection.rewire_sampled(
            active, drop, scores_at, grid, 2, 4, torch.Generator().manual_seed(seed)
        )
        (read,) = asked
        assert read.numel() == 4 and set(read.tolist()) <= {1, 2, 3, 5, 6, 7, 8, 10}
        assert (read // 6).tolist() == [0, 0, 1, 1]  # two in every row
        rows = read.reshape(2, 2)
        best = rows.gather(1, grow[rows].argmax(1, keepdim=True)).squeeze(1)
        assert plan.grown.tolist() == best.tolist()


def test_sampled_two_four_draws_in_the_groups_that_lost():
    # the 1 x 8 table of test_two_four_drops_globally_and_regrows_in_the_groups_that_lost
    active = torch.tensor([0, 1, 4, 6])
    drop = torch.tensor([0.9, 0.1, 0.2, 0.8])  # flat 1 (group 0) and 4 (group 1) go
    grow = torch.tensor([5.0, 0.3, 0.7, 0.2, 0.6, 0.1, 9.0, 0.4])
    grid = Grid(1, 8, pattern=Pattern("nm", n=2, m=4))
    # 6 candidates, 3 per losing group = all of its free positions: the exact answer
    scores_at, asked = _recording(grow)
    plan = selection.rewire_sampled(active, drop, scores_at, grid, 2, 6, torch.Generator())
    assert plan.keep.tolist() == [T, F, F, T]
    assert torch.cat(asked).tolist() == [1, 2, 3, 4, 5, 7]  # never 0 or 6 (kept)
    assert plan.grown.tolist() == [2, 4]
    # one drop (group 1 only): group 0 reads nothing; 2 candidates, 2 of {4, 5, 7}
    for seed in range(10):
        scores_at, asked = _recording(grow)
        plan = selection.rewire_sampled(
            active, torch.tensor([0.9, 0.5, 0.2, 0.8]), scores_at, grid, 1, 2,
            torch.Generator().manual_seed(seed),
        )  # fmt: skip
        (read,) = asked
        assert read.numel() == 2 and set(read.tolist()) <= {4, 5, 7}
        assert plan.grown.tolist() == [read[grow[read].argmax()].item()]


def test_sampled_block_growth_scores_candidate_tiles_by_their_sum():
    # the 2 x 4 table of test_block_pattern_pools_the_scores_over_each_tile (1 x 2 tiles)
    pattern = Pattern("block", r=1, c=2)
    active = torch.tensor([0, 1, 6, 7])
    drop = torch.tensor([0.1, 0.2, 0.5, 0.4])  # tile 0 goes
    grow = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.9, 0.0, 0.0, 0.0])  # tile 1: 1.0, tile 2: 0.9
    grid = Grid(2, 4, pattern=pattern)
    scores_at, asked = _recording(grow)
    # 6 candidate weights = 3 tiles = every free tile (0, 1, 2): the exact answer
    plan = selection.rewire_sampled(active, drop, scores_at, grid, 2, 6, torch.Generator())
    assert plan.keep.tolist() == [F, F, T, T]
    assert sorted(torch.cat(asked).tolist()) == [0, 1, 2, 3, 4, 5]  # whole tiles 0, 1, 2
    assert plan.grown.tolist() == [2, 3]
    # 2 candidate weights = one tile: grows the tile drawn, whole
    for seed in range(10):
        scores_at, asked = _recording(grow)
        plan = selection.rewire_sampled(
            active, drop, scores_at, grid, 2, 2, torch.Generator().manual_seed(seed)
        )
        (read,) = asked
        assert read.numel() == 2 and read[0] % 2 == 0 and read[1] == read[0] + 1
        assert plan.grown.tolist() == read.tolist()


@pytest.mark.parametrize(
    ("pattern", "n_active", "n_update", "n_candidates", "saves"),
    [
        # fan-in, 4 x 10, 3 per row: drops 1 per row (n_update 4..7), 8 free per row
        ("fanin", 12, 4, 16, True),  # 4 candidates per row, half the 8 free
        ("fanin", 12, 4, 17, False),  # 5 per row: more than half
        ("fanin", 12, 3, 8, False),  # 3 // 4 = 0 per row: nothing grows
        # unstructured and N:M: the layer's 40 - 12 + n_update positions not kept
        ("unstructured", 12, 4, 16, True),
        ("unstructured", 12, 4, 17, False),
        ("2:4", 20, 4, 12, True),  # 2 * 12 <= 24
        ("2:4", 20, 4, 13, False),
        # blocks of 2 x 5 (10 weights): 4 tiles, 1 active; 3 free + the dropped one
        ("block:2x5", 10, 10, 20, True),  # 2 candidate tiles of 4
        ("block:2x5", 10, 10, 21, False),  # ceil(2.1) = 3 tiles of 4
        ("block:2x5", 10, 9, 10, False),  # 9 // 10 = 0 tiles to update
    ],
)
def test_sampled_growth_is_used_only_where_it_saves(
    pattern, n_active, n_update, n_candidates, saves
):
    grid = Grid(4, 10, pattern=parse_pattern(pattern))
    assert selection.samples_growth(grid, n_active, n_update, n_candidates) == saves
