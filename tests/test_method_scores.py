"""Golden tests of the newer methods' scores and plans on tiny tensors (hand-computed), on
both backends where the method runs on both, and of the grow initialisations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.grow_init import draw_values, parse_grow_init
from rigl.sparse.storage import SparseWeight


def _one_layer(method, backend="masked", n_in=4, n_out=2, **options):
    """A sparsifier over one bias-free Linear (out, in) and its storage."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options.setdefault("total_steps", 10)
    options.setdefault("update_interval", 2)
    sparsifier = rigl.create(method, model, optimizer, backend=backend, seed=1, **options)
    return sparsifier, sparsifier.weights[0]


def _set_active(weight, values, grads):
    """Write values and gradient of the active weights, in flat order."""
    values, grads = torch.tensor(values), torch.tensor(grads)
    flat = weight.active_positions()
    with torch.no_grad():
        if isinstance(weight, SparseWeight):
            weight.param.copy_(values)
            weight.param.grad = grads.clone()
        else:
            weight.param.zero_()
            weight.param.view(-1)[flat] = values
            weight.param.grad = torch.zeros_like(weight.param)
            weight.param.grad.view(-1)[flat] = grads


# |θ| = [0.5, 0.1, 0.2, 0.4], |∇θ| = [0, 0.35, 0.05, 0.01]
VALUES, GRADS = [0.5, -0.1, 0.2, -0.4], [0.0, 0.35, -0.05, 0.01]


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize(
    ("drop_lambda", "score", "dropped"),
    [
        (1.0, [0.5, 0.45, 0.25, 0.41], [2, 3]),  # the gradient saves the small weight 1
        (0.0, [0.5, 0.1, 0.2, 0.4], [1, 2]),  # SET: the two smallest magnitudes
        (10.0, [0.5, 3.6, 0.7, 0.5], [0, 3]),  # the tie 0.5 / 0.5 goes to both
    ],
)
def test_mest_drops_by_magnitude_plus_lambda_times_gradient(backend, drop_lambda, score, dropped):
    options = {"sparsity": 0.5, "distribution": "uniform", "drop_fraction": 0.5}
    sparsifier, weight = _one_layer(
        "mest", backend, drop_lambda=drop_lambda, decay="constant", **options
    )
    assert weight.n_active == 4 and isinstance(weight, SparseWeight) == (backend == "sparse")
    _set_active(weight, VALUES, GRADS)
    torch.testing.assert_close(sparsifier.drop_score(weight), torch.tensor(score))
    plan = sparsifier.plan_layer(0, weight, 1, torch.Generator().manual_seed(0))
    assert (~plan.keep).nonzero().squeeze(1).tolist() == dropped
    assert plan.grown.numel() == 2  # SET's random growth, as many as dropped


def test_mest_rejects_a_negative_lambda():
    with pytest.raises(rigl.ConfigError, match="drop_lambda=-1"):
        _one_layer("mest", drop_lambda=-1)


def _granet(**options):
    """GraNet on one 1x8 layer: final 4 active, updates at steps 0, 2 and 4 (end)."""
    return _one_layer(
        "granet",
        n_in=8,
        n_out=1,
        sparsity=0.5,
        distribution="uniform",
        total_steps=10,
        begin_step=0,
        end_step=4,
        update_interval=2,
        drop_fraction=0.4,
        decay="constant",
        **options,
    )


def test_granet_prunes_to_the_cubic_count_then_regrows_by_gradient():
    sparsifier, weight = _granet()
    assert weight.n_active == 8  # dense start
    values = [0.8, -0.1, 0.3, 0.05, -0.6, 0.2, 0.7, -0.02]
    grads = [0.0, 0.9, 0.1, 0.05, 0.0, 0.2, 0.0, 0.5]
    _set_active(weight, values, grads)
    # step 2: p = 1 - (1 - 2/4)^3 = 0.875, zeros floor(0.875 * 4) = 3, so 5 are kept:
    # positions 0, 2, 4, 5, 6 (7, 3 and 1 have the smallest |θ|); then floor(0.4 * 5) = 2
    # of them are dropped (5 and 2, |θ| 0.2 and 0.3) and 2 grow where |∇| is largest among
    # the 5 positions not kept: 1 (0.9) and 7 (0.5).
    plan = sparsifier.plan_layer(0, weight, 2, torch.Generator().manual_seed(0))
    assert weight.active_positions()[plan.keep].tolist() == [0, 4, 6]
    assert sorted(plan.grown.tolist()) == [1, 7]
    # step 4 (the end): the final count 4; no regrowth at or after end_step (f = 0)
    plan = sparsifier.plan_layer(0, weight, 4, torch.Generator().manual_seed(0))
    assert weight.active_positions()[plan.keep].tolist() == [0, 2, 4, 6]
    assert plan.grown.numel() == 0


def test_granet_from_a_sparse_start_prunes_from_its_initial_count():
    sparsifier, weight = _granet(initial_sparsity=0.25)
    assert weight.n_active == 6 and sparsifier.initial_counts() == [6]
    # zeros go from 2 to 4: at step 2, 8 - floor(2 + 0.875 * 2) = 5 are kept
    _set_active(weight, [0.6, -0.5, 0.4, 0.3, 0.2, 0.1], [0.0] * 6)
    plan = sparsifier.plan_layer(0, weight, 2, torch.Generator().manual_seed(0))
    assert plan.n_kept + plan.grown.numel() == 5
    with pytest.raises(rigl.ConfigError, match="initial_sparsity=0.6 is above sparsity=0.5"):
        _granet(initial_sparsity=0.6)
    with pytest.raises(rigl.ConfigError, match="backend='sparse' does not support method"):
        _granet(backend="sparse")


def test_granet_training_flops_are_rigls_formula_on_the_pruning_average():
    """From dense with the default schedule facts, ``f̄ = f_D - r (f_D - f_S)``; at f_S =
    f_D it is dense training, and a sparse start costs less than a dense one."""
    f_s, f_d, dt = 0.2, 1.0, 100
    r = rigl.flops_train.pruning_flops_fraction()
    f_mean = f_d - r * (f_d - f_s)
    expected = (3 * f_mean * dt + 2 * f_mean + f_d) / (dt + 1) / (3 * f_d)
    assert rigl.train_flops_ratio("granet", f_s, f_d, update_interval=dt) == pytest.approx(expected)
    half = rigl.train_flops_ratio("granet", f_s, f_d, initial_sparsity_fraction=0.5)
    assert half < rigl.train_flops_ratio("granet", f_s, f_d)
    assert rigl.train_flops_ratio("granet", f_s, f_d) > rigl.train_flops_ratio("gmp", f_s, f_d)


# -- grow initialisation -------------------------------------------------------------------
def test_grow_init_names_and_divisors():
    assert parse_grow_init("zeros") == ("zeros", 1.0)
    assert parse_grow_init("random_normal_2") == ("random_normal", 2.0)
    assert parse_grow_init("initial_dist_.5") == ("initial_dist", 0.5)
    for bad in ("gaussian", "random_normal_0", "random_normal_-1", "zeros_", None):
        with pytest.raises(rigl.ConfigError, match="grow_init=.* is unknown; allowed: zeros"):
            parse_grow_init(bad)


def test_grow_init_draws_follow_the_layers_statistics():
    g = torch.Generator().manual_seed(0)
    current = torch.tensor([1.0, -1.0, 1.0, -1.0])  # std 1, mean |θ| 1
    normal = draw_values("random_normal", 20_000, current * 0.5, None, g)
    assert float(normal.std()) == pytest.approx(0.5, rel=0.03)
    uniform = draw_values("random_uniform", 20_000, current * 0.3, None, g)
    assert float(uniform.abs().max()) <= 0.3 and float(uniform.abs().max()) > 0.29
    assert float(uniform.mean()) == pytest.approx(0.0, abs=0.01)
    initial = torch.tensor([0.7, -0.2, 0.4, 0.9])
    drawn = draw_values("initial_dist", 3, current, initial, g)
    assert len(set(drawn.tolist())) == 3 and set(drawn.tolist()) <= set(initial.tolist())
    assert torch.equal(draw_values("zeros", 2, current, None, g), torch.zeros(2))


@pytest.mark.parametrize("grow_init", ["random_normal", "random_uniform_2", "initial_dist"])
def test_grown_weights_start_at_their_grow_init_values_on_both_backends(grow_init):
    """One SET update on a 6x10 layer: the grown weights hold values (not zero), with
    fresh optimizer state, the same on the masked and the compressed backend."""
    grown = {}
    for backend in ("masked", "sparse"):
        options = {"sparsity": 0.6, "distribution": "uniform", "total_steps": 8}
        sparsifier, weight = _one_layer(
            "set", backend, n_in=10, n_out=6, update_interval=2, grow_init=grow_init, **options
        )
        model = sparsifier.model
        initial = weight.active_values().clone()
        before = weight.active_positions().clone()
        for t in range(3):  # the update comes after step 2's optimizer step
            model.zero_grad()
            model(torch.randn(4, 10, generator=torch.Generator().manual_seed(t))).sum().backward()
            sparsifier.step()
        new = ~torch.isin(weight.active_positions(), before)
        assert new.any()
        values = weight.active_values()[new]
        assert bool((values != 0).all())
        if grow_init == "initial_dist":
            assert set(values.tolist()) <= set(initial.tolist())
        grown[backend] = (weight.active_positions()[new], values)
    assert torch.equal(grown["masked"][0], grown["sparse"][0])
    torch.testing.assert_close(grown["masked"][1], grown["sparse"][1])


def test_grow_init_zeros_is_todays_behaviour_and_initial_values_are_checkpointed():
    a, wa = _one_layer("rigl", sparsity=0.5, total_steps=8, update_interval=2)
    b, wb = _one_layer("rigl", sparsity=0.5, total_steps=8, update_interval=2, grow_init="zeros")
    for sparsifier in (a, b):
        for t in range(4):
            sparsifier.model.zero_grad()
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(t))
            sparsifier.model(x).pow(2).sum().backward()
            sparsifier.step()
    assert torch.equal(wa.mask, wb.mask) and torch.equal(wa.param, wb.param)
    c, _ = _one_layer("rigl", sparsity=0.5, grow_init="initial_dist")
    d, _ = _one_layer("rigl", sparsity=0.5, grow_init="initial_dist")
    with torch.no_grad():
        d.model[0].weight.mul_(2)  # another model, whose initial values are not c's
    d.initial_values = {}
    d.load_state_dict(c.state_dict())
    assert torch.equal(d.initial_values["0.weight"], c.initial_values["0.weight"])


# -- the command line ----------------------------------------------------------------------
def test_the_newer_methods_train_compare_and_count_flops_through_the_cli(tmp_path):
    """``rigl train`` (MEST on the compressed backend, with an option), ``rigl compare``
    and ``rigl flops`` with the new names, end to end on tiny data."""
    import json

    from conftest import tiny_run_config
    from test_registry import _run_cli

    data = tmp_path / "data"
    data.mkdir()
    config = tiny_run_config(tmp_path, data, method="mest", backend="sparse", epochs=1,
                             checkpoint_every=0, method_options={"drop_lambda": 2.0,
                                                                 "grow_init": "random_normal"})  # fmt: skip
    plain = tiny_run_config(tmp_path / "plain", data, epochs=1, checkpoint_every=0)
    compare = ["compare", "--config", str(plain), "--methods", "mest,granet",
               "--sparsities", "0.8", "--seeds", "1", "--jobs", "1",
               "--out", str(tmp_path / "c")]  # fmt: skip
    train, cmp, flops = _run_cli(
        [["train", "--config", str(config), "--quiet"], compare,
         ["flops", "--model", "mlp", "--method", "granet", "--json"]],
        plugins="",
    )  # fmt: skip
    assert train["rc"] == cmp["rc"] == flops["rc"] == 0, cmp["err"][-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["train_flops_ratio"] == pytest.approx(final["inference_flops_ratio"])  # 3 f_S
    assert "| MEST |" in cmp["out"] and "| GraNet |" in cmp["out"]
    records = json.loads((tmp_path / "c" / "results.json").read_text())["records"]
    assert sorted(r["method"] for r in records) == ["dense", "granet", "mest"]
    granet = next(r for r in records if r["method"] == "granet")
    assert granet["train_flops_ratio"] > granet["inference_flops_ratio"]  # the dense start
    report = json.loads(flops["out"])
    assert report["inference_flops_ratio"] < report["train_flops_ratio"] < 1
