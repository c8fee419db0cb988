"""One invariant battery run over every registered method x distribution x model x optimizer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rigl
from conftest import MODELS, batch, make_optimizer
from rigl.schedules import PruningSchedule, UpdateSchedule
from rigl.sparse import CondensedLinear
from rigl.sparse.storage import SparseWeight

STEPS, INTERVAL = 24, 4
# the battery's methods come from the registry, grouped by what they declare
SPARSE_START = [m for m in rigl.list_methods() if not rigl.get_method(m).dense_start]
COMPRESSIBLE = [m for m in rigl.list_methods() if rigl.get_method(m).supports_sparse_backend]


def _expected_active(sparsifier, step: int, start: list[int]) -> list[int]:
    """Active counts the method must have after ``step`` optimizer steps: the targets (all
    weights for the dense baseline), or a pruning schedule's share of the way from the
    ``start`` counts to them."""
    counts, numels = sparsifier.target_counts, [w.numel for w in sparsifier.weights]
    if isinstance(sparsifier.schedule, PruningSchedule):
        progress = max(
            (
                sparsifier.schedule.progress(t)
                for t in range(step)
                if sparsifier.schedule.should_update(t)
            ),
            default=0.0,
        )
        return [
            n - math.floor((n - s) + progress * (s - c))
            for n, c, s in zip(numels, counts, start, strict=True)
        ]
    return counts


def _battery_run(method, distribution, model_name, optimizer_name, **options):
    """(model, optimizer, sparsifier) of one battery case."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    optimizer = make_optimizer(optimizer_name, model)
    sparsifier = rigl.create(
        method,
        model,
        optimizer,
        sparsity=0.8,
        distribution=distribution,
        total_steps=STEPS,
        update_interval=INTERVAL,
        end_step=0.75,
        drop_fraction=0.5,
        seed=3,
        **options,
    )
    return model, optimizer, sparsifier


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("method", rigl.list_methods())
def test_invariants(method, distribution, model_name, optimizer_name):
    _check_battery(method, distribution, model_name, optimizer_name)


# Options that change what a method does, each through the battery (one model per row, to
# keep it short): (method, options). The methods themselves come from the registry above.
OPTION_ROWS = [
    ("mest", {"drop_lambda": 0.0}),
    ("mest", {"drop_lambda": 10.0, "grow_init": "random_uniform"}),
    ("granet", {"initial_sparsity": 0.5}),
    ("granet", {"grow_init": "initial_dist"}),
    ("rigl", {"grow_init": "random_normal"}),
    ("set", {"grow_init": "initial_dist_2", "skip_optimizer_step_on_update": True}),
    ("snfs", {"grow_init": "random_uniform"}),
]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize(("method", "options"), OPTION_ROWS, ids=str)
def test_invariants_of_method_options(method, options, optimizer_name):
    _check_battery(method, "erk", "mlp", optimizer_name, **options)


def _check_battery(method, distribution, model_name, optimizer_name, **options):
    model, optimizer, sparsifier = _battery_run(
        method, distribution, model_name, optimizer_name, **options
    )
    zero_growth = getattr(sparsifier, "grow_init", "zeros") == "zeros"
    start = [w.n_active for w in sparsifier.weights]
    # depthwise convs, biases and norm parameters are never sparsified
    assert all(name.endswith("weight") or "weight_" in name for name in sparsifier.masks)
    assert "depthwise.weight" not in sparsifier.masks and "bn.weight" not in sparsifier.masks
    updates_seen = 0
    for t in range(STEPS):
        before = {w.name: (w.mask.clone(), w.param.detach().clone()) for w in sparsifier.weights}
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        expected = _expected_active(sparsifier, t + 1, start)
        for weight, n_expected in zip(sparsifier.weights, expected, strict=True):
            old_mask, old_value = before[weight.name]
            # masked weights are exactly zero and the count is exact
            assert bool((weight.param[~weight.mask] == 0).all()), weight.name
            assert int(weight.mask.sum()) == weight.n_active == n_expected, (weight.name, t)
            # optimizer state is zero wherever the weight is not trained: the inactive
            # weights (so grown weights start with zero momentum / Adam moments), or outside
            # the trained set of a method that trains more than its forward set (reserve)
            untrained = ~getattr(weight, "trained", weight.mask)
            for key, value in optimizer.state[weight.param].items():
                if torch.is_tensor(value) and value.shape == weight.param.shape:
                    assert bool((value[untrained] == 0).all()), (key, weight.name, t)
            grown = weight.mask & ~old_mask
            if grown.any():
                updates_seen += 1
                if sparsifier.skip_optimizer_step_on_update:
                    # no optimizer step: grown weights are zero (or their grow_init values),
                    # kept ones unchanged
                    assert bool((weight.param[grown] == 0).all()) == zero_growth
                    kept = weight.mask & old_mask
                    assert torch.equal(weight.param[kept], old_value[kept])
    if isinstance(sparsifier.schedule, UpdateSchedule):  # the dynamic methods
        assert updates_seen > 0 and sparsifier.update_count == len(
            [t for t in range(STEPS) if sparsifier.schedule.should_update(t)]
        )
    if method in SPARSE_START:
        assert [w.n_active for w in sparsifier.weights] == sparsifier.target_counts


def _entries(weight, optimizer) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Active flat positions (sorted), their values and their weight-shaped optimizer
    state, on either backend."""
    states = [
        v
        for v in optimizer.state.get(weight.param, {}).values()
        if torch.is_tensor(v) and v.shape == weight.param.shape
    ]
    if isinstance(weight, SparseWeight):
        return (
            weight.layer.active_indices(),
            weight.param.detach().clone(),
            [s.clone() for s in states],
        )
    pos = weight.mask.reshape(-1).nonzero().squeeze(1)
    flat = weight.param.detach().reshape(-1)
    return pos, flat[pos].clone(), [s.reshape(-1)[pos].clone() for s in states]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
@pytest.mark.parametrize("method", COMPRESSIBLE)
def test_invariants_on_the_compressed_backend(method, distribution, model_name, optimizer_name):
    """The battery with backend='sparse': Linear and convolution layers compressed (not the
    depthwise one), the rest masked."""
    model, optimizer, sparsifier = _battery_run(
        method, distribution, model_name, optimizer_name, backend="sparse"
    )
    compressed = {w.name for w in sparsifier.weights if isinstance(w, SparseWeight)}
    if model_name == "cnn":
        assert compressed == {"conv1.weight", "conv2.weight", "head.weight"}
    assert compressed
    updates_seen = 0
    for t in range(STEPS):
        before = {w.name: _entries(w, optimizer) for w in sparsifier.weights}
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        for weight, n in zip(sparsifier.weights, sparsifier.target_counts, strict=True):
            pos, values, states = _entries(weight, optimizer)
            assert pos.numel() == weight.n_active == n, (weight.name, t)
            assert bool((pos[1:] > pos[:-1]).all())
            if isinstance(weight, SparseWeight):  # nothing of the dense shape is kept
                assert weight.param.numel() == n
                for value in optimizer.state.get(weight.param, {}).values():
                    assert not torch.is_tensor(value) or value.numel() in (1, n)
            else:
                assert bool((weight.param[~weight.mask] == 0).all()), weight.name
            old_pos, old_values, _ = before[weight.name]
            grown = ~torch.isin(pos, old_pos)
            if grown.any():
                updates_seen += 1
                for state in states:  # grown weights start with zero optimizer state
                    assert bool((state[grown] == 0).all()), (weight.name, t)
                if sparsifier.skip_optimizer_step_on_update:
                    assert bool((values[grown] == 0).all())
                    kept = torch.isin(old_pos, pos)
                    assert torch.equal(values[~grown], old_values[kept])
    if isinstance(sparsifier.schedule, UpdateSchedule):
        assert updates_seen > 0
    assert [w.n_active for w in sparsifier.weights] == sparsifier.target_counts


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.integers(1, 24), min_size=2, max_size=4),
    sparsity=st.floats(0.0, 0.99),
    method=st.sampled_from(SPARSE_START),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_property_counts_stay_exact_on_random_mlps(widths, sparsity, method, distribution):
    torch.manual_seed(0)
    layers = []
    for n_in, n_out in itertools.pairwise([12, *widths]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = rigl.create(
        method,
        model,
        optimizer,
        sparsity=sparsity,
        distribution=distribution,
        total_steps=12,
        update_interval=2,
        drop_fraction=0.5,
    )
    counts = rigl.active_counts([w.shape for w in sparsifier.weights], sparsity, distribution)
    assert sparsifier.target_counts == counts
    for t in range(12):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        for weight, n in zip(sparsifier.weights, counts, strict=True):
            assert weight.n_active == int(weight.mask.sum()) == n
            assert bool((weight.param[~weight.mask] == 0).all())


# -- the battery under structured patterns (rigl.patterns) -------------------------------------
PATTERNS = {"fanin": 0.8, "2:4": 0.5, "1:8": 0.875, "block:2x4": 0.8}  # pattern: its sparsity
P_STEPS, P_INTERVAL = 12, 3


def _pattern_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)
    )  # fmt: skip


def _pattern_run(method, pattern, distribution="erk", steps=P_STEPS, backend="masked", **kw):
    torch.manual_seed(0)
    model = _pattern_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = rigl.create(
        method, model, optimizer, sparsity=PATTERNS[pattern], distribution=distribution,
        pattern=pattern, total_steps=P_STEPS, update_interval=P_INTERVAL, end_step=0.75,
        drop_fraction=0.5, seed=3, backend=backend, **kw,
    )  # fmt: skip
    return model, optimizer, sparsifier


def _pattern_steps(model, optimizer, sparsifier, steps, start=0, on_step=None):
    for t in range(start, start + steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(t))
        y = torch.randint(0, 8, (8,), generator=torch.Generator().manual_seed(t))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        if on_step is not None:
            on_step(t)


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", rigl.list_methods())
def test_invariants_under_patterns(method, pattern, distribution):
    """After every step: exact counts, the pattern held (equal per row / group, whole tiles;
    ``check()``), masked weights and their optimizer state zero, grown weights zero where
    no step followed the update."""
    model, optimizer, sparsifier = _pattern_run(method, pattern, distribution)
    before = {}

    def check(t):
        sparsifier.check()
        for weight in sparsifier.weights:
            grown = weight.mask & ~before[weight.name]
            if grown.any() and sparsifier.skip_optimizer_step_on_update:
                assert bool((weight.param[grown] == 0).all()), (weight.name, t)
                for value in optimizer.state[weight.param].values():
                    if torch.is_tensor(value) and value.shape == weight.param.shape:
                        assert bool((value[grown] == 0).all()), (weight.name, t)
            before[weight.name] = weight.mask.clone()

    for weight in sparsifier.weights:
        before[weight.name] = weight.mask.clone()
    _pattern_steps(model, optimizer, sparsifier, P_STEPS, on_step=check)
    if rigl.get_method(method).sparse:
        assert [w.n_active for w in sparsifier.weights] == sparsifier.target_counts
        assert all(w.pattern.structured for w in sparsifier.weights)
    if isinstance(sparsifier.schedule, UpdateSchedule):
        due = [t for t in range(P_STEPS) if sparsifier.schedule.should_update(t)]
        assert sparsifier.update_count == len(due) > 0


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", COMPRESSIBLE)
def test_patterns_choose_the_same_masks_on_both_backends(method, pattern, monkeypatch):
    from rigl.sparse import storage as sparse_storage

    monkeypatch.setattr(sparse_storage, "BLOCK_ELEMENTS", 64)  # grow scores read in row blocks
    runs = []
    for backend in ("masked", "sparse"):
        model, optimizer, sparsifier = _pattern_run(method, pattern, backend=backend)
        _pattern_steps(model, optimizer, sparsifier, P_STEPS)
        sparsifier.check()
        runs.append(sparsifier)
    assert any(isinstance(w, SparseWeight) for w in runs[1].weights)
    for name, mask in runs[0].masks.items():
        assert torch.equal(mask, runs[1].masks[name]), name


@pytest.mark.parametrize(
    ("backend", "options"),
    [("masked", {}), ("sparse", {}), ("sparse", {"grow_candidates": 1.5})],
    ids=["masked", "sparse", "sparse-sampled"],
)
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_resume_under_a_pattern_is_bit_identical(pattern, backend, options):
    model, optimizer, sparsifier = _pattern_run("rigl", pattern, backend=backend, **options)
    _pattern_steps(model, optimizer, sparsifier, P_STEPS)
    model2, optimizer2, sparsifier2 = _pattern_run("rigl", pattern, backend=backend, **options)
    _pattern_steps(model2, optimizer2, sparsifier2, 5)
    saved = [
        {k: v.clone() for k, v in model2.state_dict().items()},
        optimizer2.state_dict(),
        sparsifier2.state_dict(),
    ]
    model3, optimizer3, sparsifier3 = _pattern_run("rigl", pattern, backend=backend, **options)
    sparsifier3.load_state_dict(saved[2])
    model3.load_state_dict(saved[0])
    optimizer3.load_state_dict(saved[1])
    _pattern_steps(model3, optimizer3, sparsifier3, P_STEPS - 5, start=5)
    for name, mask in sparsifier.masks.items():
        assert torch.equal(mask, sparsifier3.masks[name]), name
    for a, b in zip(model.state_dict().values(), model3.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _count_sampled(monkeypatch) -> list[str]:
    """Record the weights whose growth ran through rigl.selection.rewire_sampled."""
    from rigl import selection

    calls, sampled = [], selection.rewire_sampled

    def counting(active, drop_score, scores_at, grid, *args):
        calls.append(grid.name)
        return sampled(active, drop_score, scores_at, grid, *args)

    monkeypatch.setattr(selection, "rewire_sampled", counting)
    return calls


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_invariants_of_sampled_growth_under_patterns(pattern, monkeypatch):
    """RigL's grow_candidates on compressed layers (CondensedLinear for fan-in and N:M, CSR
    for blocks): after every step exact counts and the pattern (``check()``), grown weights
    and their optimizer state zero; every layer grew from candidates."""
    calls = _count_sampled(monkeypatch)
    model, optimizer, sparsifier = _pattern_run(
        "rigl", pattern, backend="sparse", grow_candidates=1.5
    )
    condensed = pattern != "block:2x4"  # fan-in and N:M layers: values (out, k)
    assert all(isinstance(w.layer, CondensedLinear) == condensed for w in sparsifier.weights)
    before = {w.name: _entries(w, optimizer)[0] for w in sparsifier.weights}

    def check(t):
        sparsifier.check()
        for weight in sparsifier.weights:
            pos, values, states = _entries(weight, optimizer)
            grown = ~torch.isin(pos, before[weight.name])
            assert bool((values[grown] == 0).all()), (weight.name, t)
            for state in states:
                assert bool((state[grown] == 0).all()), (weight.name, t)
            before[weight.name] = pos

    _pattern_steps(model, optimizer, sparsifier, P_STEPS, on_step=check)
    assert sparsifier.update_count > 0
    assert [w.n_active for w in sparsifier.weights] == sparsifier.target_counts
    assert set(calls) == {w.name for w in sparsifier.weights}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_sampled_growth_under_patterns_chooses_the_same_masks_on_both_backends(
    pattern, monkeypatch
):
    """The masked storage samples too once told it holds no dense gradient: the same
    candidates, gradients and masks as the compressed one (a function of the seed)."""
    from rigl.storage import MaskedWeight

    calls = _count_sampled(monkeypatch)
    runs, n_sampled = [], []
    for backend, holds in (("masked", True), ("masked", False), ("sparse", False)):
        monkeypatch.setattr(MaskedWeight, "holds_dense_gradient", holds)
        model, optimizer, sparsifier = _pattern_run(
            "rigl", pattern, backend=backend, grow_candidates=1.5
        )
        _pattern_steps(model, optimizer, sparsifier, P_STEPS)
        sparsifier.check()
        runs.append(sparsifier.masks)
        n_sampled.append(len(calls) - sum(n_sampled))
    exact, masked, compressed = runs
    assert n_sampled[0] == 0 and n_sampled[1] == n_sampled[2] > 0
    for name, mask in masked.items():
        assert torch.equal(mask, compressed[name]), name
    assert any(not torch.equal(m, exact[k]) for k, m in masked.items())  # not the exact scan
