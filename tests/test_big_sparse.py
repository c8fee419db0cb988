"""Big-Sparse: networks built directly sparse, with no buffer of a layer's dense shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import rigl
from rigl import selection, topology
from rigl.blockwise import blockwise_topk
from rigl.patterns import initial_positions, parse_pattern
from rigl.rewiring import Grid
from rigl.sparse import SparseLinear
from rigl.sparse import storage as sparse_storage
from rigl.topology import random_indices, random_indices_outside, topk_indices, update_generator

WIDTH = 8192  # 67M positions in the middle layer: above PERMUTATION_MAX, so no permutation


def _meta_mlp(width: int = WIDTH, n_in: int = 32, n_out: int = 4) -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(
            nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, n_out),
        )  # fmt: skip


# -- sampling positions ------------------------------------------------------------------
def test_random_indices_keeps_the_permutation_below_the_threshold():
    for numel, n in [(100, 17), (5000, 5000), (3, 0)]:
        a = random_indices(numel, n, torch.Generator().manual_seed(3))
        b = torch.randperm(numel, generator=torch.Generator().manual_seed(3))[:n]
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [0, 1, 300, 1900, 2000])  # sparse, and dense (complement) draws
def test_random_indices_above_the_threshold_are_exact_distinct_and_seeded(monkeypatch, n):
    monkeypatch.setattr(topology, "PERMUTATION_MAX", 10)
    a = random_indices(2000, n, update_generator(0, -1, 1))
    assert a.numel() == n and torch.unique(a).numel() == n
    assert n == 0 or (int(a.min()) >= 0 and int(a.max()) < 2000)
    assert torch.equal(a, random_indices(2000, n, update_generator(0, -1, 1)))


def test_random_indices_above_the_threshold_are_uniform(monkeypatch):
    monkeypatch.setattr(topology, "PERMUTATION_MAX", 10)
    hits = torch.zeros(50)
    for seed in range(400):  # 400 draws of 10 of 50: each position expected 80 times
        hits[random_indices(50, 10, torch.Generator().manual_seed(seed))] += 1
    chi2 = float(((hits - 80) ** 2 / 80).sum())
    assert chi2 < 100  # 49 degrees of freedom: p < 1e-5 beyond ~100


def test_random_indices_outside_avoid_the_excluded_positions():
    excluded = torch.sort(torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:600])
    chosen = random_indices_outside(1000, 400, excluded.values, torch.Generator().manual_seed(1))
    assert torch.unique(chosen).numel() == 400
    assert not bool(torch.isin(chosen, excluded.values).any())
    with pytest.raises(ValueError):
        random_indices_outside(1000, 401, excluded.values, torch.Generator())


@pytest.mark.parametrize("n", [10, 30])  # rejection draws; most of the free positions
def test_random_indices_outside_are_uniform_over_the_free_positions(n):
    excluded = torch.arange(0, 60, 3)  # 20 of 60 excluded, 40 free
    hits = torch.zeros(60)
    for seed in range(400):  # 400 draws of n of 40: each free position expected 10 n times
        hits[random_indices_outside(60, n, excluded, torch.Generator().manual_seed(seed))] += 1
    assert float(hits[excluded].sum()) == 0
    free = torch.ones(60, dtype=torch.bool)
    free[excluded] = False
    chi2 = float(((hits[free] - 10 * n) ** 2 / (10 * n * (1 - n / 40))).sum())
    assert chi2 < 85  # 39 degrees of freedom: p < 1e-5 beyond ~85


@pytest.mark.parametrize("block_elements", [7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("k", [1, 25, 300])
def test_blockwise_topk_equals_one_topk(block_elements, k):
    g = torch.Generator().manual_seed(k)
    rows, cols = 40, 30
    score = torch.randint(0, 6, (rows * cols,), generator=g).float()  # many exact ties
    kept = torch.sort(torch.randperm(rows * cols, generator=g)[:200]).values
    masked = score.clone()
    masked[kept] = -torch.inf
    expected = topk_indices(masked, k, torch.Generator().manual_seed(9))  # ties: seeded draws
    grow = lambda r0, r1: score[r0 * cols : r1 * cols]  # noqa: E731
    block_rows = max(1, block_elements // cols)  # as the compressed storage's grid has it
    got = blockwise_topk(
        grow, rows, cols, kept, k, torch.Generator().manual_seed(9), "w", block_rows
    )
    assert torch.equal(torch.sort(got).values, torch.sort(expected).values)


# -- building from shapes ----------------------------------------------------------------
def test_a_meta_model_becomes_sparse_without_a_dense_weight():
    model = _meta_mlp(width=64, n_in=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create("static", model, opt, sparsity=0.9, backend="sparse")
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    assert not any(p.is_meta for p in model.parameters())
    in_optimizer = {id(p) for p in opt.param_groups[0]["params"]}
    assert in_optimizer == {id(p) for p in model.parameters()}
    counts = rigl.layer_densities(_meta_mlp(width=64, n_in=12), 0.9, "erk")
    for w, density in zip(sp.weights, counts.values(), strict=True):
        assert w.n_active == round(density * w.numel)
        bound = 1 / w.cols**0.5
        values = w.param.detach().abs()
        assert float(values.max()) <= bound and float(values.min()) > 0
    x = torch.randn(8, 12)
    nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    sp.step()


def test_meta_models_need_the_sparse_backend_for_every_meta_layer():
    with pytest.raises(rigl.ConfigError, match="meta device"):
        rigl.create("static", _meta_mlp(width=16), None, sparsity=0.9, backend="masked")
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(rigl.ConfigError, match="1.weight"):
        rigl.create("static", model, None, sparsity=0.5, backend="sparse")


def test_flops_of_a_model_too_large_to_build_come_from_its_meta_form():
    model = _meta_mlp(width=65536, n_in=784, n_out=10)
    densities = rigl.layer_densities(model, 0.999, "erk")
    report = rigl.count_flops(model, torch.zeros(1, 784, device="meta"), densities)
    assert report.params == 784 * 65536 + 65536**2 + 65536 * 10
    assert report.active_params < 0.0011 * report.params


# -- grow from sampled candidates ------------------------------------------------------------
def _train(grow_candidates, steps=40, backend="sparse"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = rigl.create(
        "rigl", model, opt, sparsity=0.9, total_steps=steps, update_interval=5, seed=2,
        backend=backend, grow_candidates=grow_candidates,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 24, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    return sp


def test_grow_candidates_keep_counts_and_fall_back_to_exact_rigl_when_not_fewer():
    exact, sampled = _train(None), _train(3)
    assert sampled.update_count == exact.update_count > 3
    assert [w.n_active for w in sampled.weights] == [w.n_active for w in exact.weights]
    assert any(not torch.equal(exact.masks[k], sampled.masks[k]) for k in exact.masks)
    everything = _train(1e9)  # more candidates than positions: exact RigL
    for k in exact.masks:
        assert torch.equal(exact.masks[k], everything.masks[k])
    masked = _train(3, backend="masked")  # masked layers grow exactly
    for k in exact.masks:
        assert torch.equal(exact.masks[k], masked.masks[k])


@pytest.mark.parametrize("bad", [0.5, 0, "many", True])
def test_grow_candidates_are_validated(bad):
    with pytest.raises(rigl.ConfigError, match="grow_candidates"):
        rigl.create("rigl", nn.Linear(4, 4), None, grow_candidates=bad)


@pytest.mark.parametrize("pattern", ["fanin", "block:4x4"])
def test_sampled_growth_under_a_pattern_reads_and_holds_only_candidates(pattern):
    """On a 4096 x 8192 weight (134 MB as float32) at density 0.001, a sampled fan-in or
    block update allocates memory for the active weights and the candidates only (N:M's
    density is N/M: its active weights are a fixed share of the layer anyway)."""
    rows, cols = 4096, 8192
    parsed = parse_pattern(pattern)
    n_active = {"fanin": 8 * rows, "block:4x4": 16 * 2048}[pattern]
    active = initial_positions(parsed, rows, cols, n_active, torch.Generator().manual_seed(0))
    score = torch.rand(n_active, generator=torch.Generator().manual_seed(1))
    asked = []

    def scores_at(flat):
        asked.append(flat.numel())
        return (flat * 2654435761 % 1000).float()  # a score without a dense table

    n_update, grid, plan = n_active // 4, Grid(rows, cols, pattern=parsed), []

    def update() -> None:
        generator = torch.Generator().manual_seed(2)
        plan.append(
            selection.rewire_sampled(
                active, score, scores_at, grid, n_update, 2 * n_update, generator
            )
        )

    largest, op = _largest_allocation(update)
    assert plan[0].grown.numel() == int((~plan[0].keep).sum()) == n_update
    assert sum(asked) <= 4 * n_update  # the candidates, never the whole layer
    # a few int64 / float32 entries per active weight and per candidate (2 n_update);
    # a dense float32 score would be 4 rows cols = 134 MB
    assert largest < 32 * (n_active + 2 * n_update), (largest, op)


# -- the memory bound ----------------------------------------------------------------------
def _largest_allocation(fn) -> tuple[int, str]:
    """The largest memory any single op allocated itself while ``fn`` ran (bytes, op name)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.events() if e.name != "[memory]"]
    top = max(events, key=lambda e: e.self_cpu_memory_usage)
    return int(top.self_cpu_memory_usage), top.name


@pytest.mark.parametrize(
    ("method", "options"), [("rigl", {}), ("rigl", {"grow_candidates": 4}), ("set", {})]
)
def test_no_buffer_of_the_dense_shape_during_creation_steps_and_updates(
    method, options, monkeypatch
):
    monkeypatch.setattr(sparse_storage, "BLOCK_ELEMENTS", 1 << 20)  # grow scans 4 MB blocks
    dense_bool_mask = WIDTH * WIDTH  # bytes; a dense float buffer would be 4x that
    state = {}

    def run() -> None:
        model = _meta_mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sp = rigl.create(
            method, model, opt, sparsity=0.999, total_steps=30, update_interval=4,
            backend="sparse", **options,
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        for _ in range(9):  # updates at steps 4 and 8
            x, y = torch.randn(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
        state["checkpoint"] = sp.state_dict()
        state["sp"] = sp

    largest, op = _largest_allocation(run)
    sp = state["sp"]
    assert sp.update_count == 2 and sp.last_update[1].n_grown > 0
    assert state["checkpoint"]["masks"]["2.weight"].numel() == sp.weights[1].n_active
    # Bounded by the blocks of the grow scan (BLOCK_ELEMENTS floats), far below dense.
    assert largest <= 4 * sparse_storage.BLOCK_ELEMENTS * 1.1, (largest, op)
    assert largest < dense_bool_mask / 4, (largest, op)


def test_grad_at_matches_the_dense_gradient_in_any_order_and_chunking():
    layer = SparseLinear(50, 40, density=0.3, generator=torch.Generator().manual_seed(0))
    layer.keep_grow_inputs(True)
    for _ in range(2):  # accumulated over two backward calls
        layer(torch.randn(8, 50)).square().sum().backward()
    flat = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:700]
    dense = layer.grad_rows(0, 40).reshape(-1)[flat]
    torch.testing.assert_close(layer.grad_at(flat), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.grad_at(flat, chunk=64), dense, rtol=1e-5, atol=1e-5)
