"""Golden tables for the sparsity distributions (hand-computed) and property tests."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rigl
from rigl.distributions import active_counts, layer_sparsities, n_zeros_for


def test_uniform_is_the_global_sparsity_everywhere():
    assert layer_sparsities([(4, 2), (4, 4)], 0.5, "uniform") == [0.5, 0.5]
    # floor(0.5 * 8) = 4 zeros, floor(0.5 * 16) = 8 zeros
    assert active_counts([(4, 2), (4, 4)], 0.5, "uniform") == [4, 8]


def test_erk_golden_without_overflow():
    # scores sum(shape)/prod(shape): A 6/8 = .75, B 8/16 = .5, C 6/8 = .75
    # budget .5 * 32 = 16; divisor .75*8 + .5*16 + .75*8 = 20; eps = .8
    # densities .6, .4, .6 -> shares 4.8, 6.4, 4.8 weights: floors 4, 6, 4 and the two
    # weights left go to the largest fractional parts (.8, .8), so exactly 16 in all
    sparsities = layer_sparsities([(4, 2), (4, 4), (2, 4)], 0.5, "erk")
    assert sparsities == pytest.approx([0.4, 0.6, 0.4])
    assert active_counts([(4, 2), (4, 4), (2, 4)], 0.5, "erk") == [5, 6, 5]


def test_erk_overflow_makes_the_top_layer_dense_and_rescales():
    # A (2,2): score 4/4 = 1; B (10,10): score 20/100 = .2. S = .5, budget 52.
    # First eps = 52 / (4 + 20) = 2.17 -> A would have density 2.17 > 1: A dense.
    # Then budget for B = .5*100 - .5*4 = 48, eps = 48/20 = 2.4, B density .48.
    sparsities = layer_sparsities([(2, 2), (10, 10)], 0.5, "erk")
    assert sparsities == pytest.approx([0.0, 0.52])
    counts = active_counts([(2, 2), (10, 10)], 0.5, "erk")
    assert counts == [4, 48]
    assert sum(counts) == 52  # exactly the uniform budget: no undershoot


def test_erk_matches_the_official_implementations():
    # google-research/rigl sparse_utils.get_sparsities_erdos_renyi and JaxPruner's
    # sparsity_distributions_test: shapes (4,2), (6,3), (6,4,2) at 80%. The budget is the
    # uniform whole-number count: 8-6 + 18-14 + 48-38 = 16 weights; scores .75, .5, .25;
    # eps = 16 / (.75*8 + .5*18 + .25*48) = 16/27.
    shapes = [(4, 2), (6, 3), (6, 4, 2)]
    assert layer_sparsities(shapes, 0.8, "erk") == pytest.approx(
        [1 - 12 / 27, 1 - 8 / 27, 1 - 4 / 27]
    )
    assert layer_sparsities(shapes, 0.8, "erk") == pytest.approx([0.556, 0.704, 0.852], abs=1e-3)
    # shares 3.56, 5.33, 7.11 weights: floors 3, 5, 7 and the one weight left goes to the
    # largest fractional part (.56)
    assert active_counts(shapes, 0.8, "erk") == [4, 5, 7]
    # the JaxPruner table at 50% (layer a overflows and is made dense)
    assert layer_sparsities(shapes, 0.5, "erk") == pytest.approx([0.0, 0.31, 0.655], abs=5e-3)


def test_erk_keeps_exactly_the_uniform_budget_on_lenet_300_100():
    shapes = [(300, 784), (100, 300), (10, 100)]
    for sparsity in (0.5, 0.9, 0.95, 0.98, 0.99):
        budget = sum(math.prod(s) - n_zeros_for(sparsity, math.prod(s)) for s in shapes)
        for dist in ("erk", "er"):
            assert sum(active_counts(shapes, sparsity, dist)) == budget, (sparsity, dist)


def test_er_uses_only_fan_in_and_fan_out_of_a_conv():
    # conv (8, 4, 3, 3): ER score (4 + 8) / 32 = .375; ERK (8+4+3+3)/288 = .0625
    # second layer linear (4, 8): ER 12/32 = .375 (tied), so ER gives both the same density,
    # that of the whole-number budget: (288 - floor(230.4)) + (32 - floor(25.6)) = 65 of 320
    er = layer_sparsities([(8, 4, 3, 3), (4, 8)], 0.8, "er")
    assert er[0] == pytest.approx(er[1]) == pytest.approx(1 - 65 / 320)
    erk = layer_sparsities([(8, 4, 3, 3), (4, 8)], 0.8, "erk")
    assert erk[0] > 0.8 > erk[1]


def test_erk_power_zero_is_uniform():
    assert layer_sparsities([(4, 2), (4, 4), (2, 4)], 0.5, "erk", erk_power=0.0) == pytest.approx(
        [0.5, 0.5, 0.5]
    )


def test_custom_layers_are_left_out_of_the_budget():
    out = layer_sparsities([(4, 2), (4, 4), (2, 4)], 0.5, "erk", custom={1: 0.0})
    assert out[1] == 0.0
    # the other two have the same score, so they share the uniform budget: .5 each
    assert out[0] == pytest.approx(0.5) and out[2] == pytest.approx(0.5)


def test_n_zeros_is_robust_to_float_error():
    assert n_zeros_for(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996
    assert n_zeros_for(0.5, 7) == 3


def test_layer_densities_on_a_model(mlp):
    dens = rigl.layer_densities(mlp, 0.9, "uniform", first_layer_dense=True)
    assert list(dens) == ["fc1.weight", "fc2.weight", "out.weight"]
    assert dens["fc1.weight"] == 1.0
    assert dens["fc2.weight"] == pytest.approx(52 / 512)  # 512 - floor(.9 * 512) = 52
    assert dens["out.weight"] == pytest.approx(7 / 64)  # 64 - floor(57.6) = 7


shapes_strategy = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 64), st.integers(1, 64)),
        st.tuples(st.integers(1, 16), st.integers(1, 16), st.integers(1, 5), st.integers(1, 5)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    shapes=shapes_strategy,
    sparsity=st.floats(0.0, 0.99),
    dist=st.sampled_from(["uniform", "er", "erk"]),
)
def test_counts_hit_the_budget_exactly(shapes, sparsity, dist):
    counts = active_counts(shapes, sparsity, dist)
    numels = [math.prod(s) for s in shapes]
    assert all(0 <= c <= n for c, n in zip(counts, numels, strict=True))
    # the uniform budget in whole weights, numel - floor(S * numel) per layer
    assert sum(counts) == sum(n - n_zeros_for(sparsity, n) for n in numels)
    # every layer is within one weight of its share (1 - s_l) * numel
    shares = [
        (1 - s) * n for s, n in zip(layer_sparsities(shapes, sparsity, dist), numels, strict=True)
    ]
    assert all(abs(c - x) < 1 + 1e-9 for c, x in zip(counts, shares, strict=True))


@settings(max_examples=100, deadline=None)
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 0.99))
def test_erk_density_grows_with_the_score(shapes, sparsity):
    sparsities = layer_sparsities(shapes, sparsity, "erk")
    scores = [sum(s) / math.prod(s) for s in shapes]
    order = sorted(range(len(shapes)), key=lambda i: scores[i])
    densities = [1 - sparsities[i] for i in order]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(densities))
    assert all(-1e-9 <= d <= 1 + 1e-9 for d in densities)
