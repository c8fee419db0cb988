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
