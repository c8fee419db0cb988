"""Optimizer state of inactive and grown weights, for every optimizer in torch.optim."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl

OPTIMIZERS = sorted(
    name
    for name, cls in vars(torch.optim).items()
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and name != "Optimizer"
)
REFUSED = {"LBFGS": "closure", "SparseAdam": "sparse gradients"}
OPTIONS = {
    "Adagrad": {"initial_accumulator_value": 0.5},
    "Rprop": {"lr": 0.02},
    "SGD": {"momentum": 0.9},
}
# What torch.optim starts each weight-shaped state tensor at, when it is not zero
FRESH = {("Adagrad", "sum"): 0.5, ("Rprop", "step_size"): 0.02}


def _model() -> nn.Module:
    torch.manual_seed(0)  # no biases: Muon takes 2-D parameters only
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))


def _sparsifier(method, name, model, **kwargs):
    optimizer = getattr(torch.optim, name)(model.parameters(), **OPTIONS.get(name, {}))
    options = {"update_interval": 2, "begin_step": 2, "end_step": 20, "decay": "constant"}
    return rigl.create(
        method, model, optimizer, sparsity=0.5, drop_fraction=0.5, **options, **kwargs
    )


def _weight_states(sparsifier, weight):
    """{key: (state tensor, fresh value)} of the weight-shaped state of ``weight``."""
    name = type(sparsifier.optimizer).__name__
    state = sparsifier.optimizer.state[weight.param]
    return {
        key: (value, FRESH.get((name, key), 0.0))
        for key, value in state.items()
        if torch.is_tensor(value) and value.shape == weight.param.shape
    }


def _step(model, sparsifier, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    sparsifier.optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sparsifier.step()


@pytest.mark.parametrize("method", ["rigl", "set"])  # update before / after the step
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in REFUSED])
def test_inactive_and_grown_weights_have_fresh_state(name, method):
    model = _model()
    sp = _sparsifier(method, name, model)
    n_grown = 0
    for t in range(7):
        before = [w.mask.clone() for w in sp.weights]
        _step(model, sp, t)
        for weight, old in zip(sp.weights, before, strict=True):
            grown = weight.mask & ~old
            n_grown += int(grown.sum())
            for key, (value, fresh) in _weight_states(sp, weight).items():
                inactive = value[~weight.mask]
                assert torch.all(inactive == fresh), (t, key, inactive.unique())
                assert torch.all(value[grown] == fresh), (t, key, value[grown].unique())
    assert sp.update_count == 3 and n_grown > 0
    assert any(_weight_states(sp, w) for w in sp.weights) or name == "Adafactor", name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_optimizers_that_cannot_follow_a_mask_are_refused_by_name(name):
    model = _model()
    with pytest.raises(rigl.ConfigError, match=f"{name}.*{REFUSED[name]}"):
        _sparsifier("rigl", name, model)


@pytest.mark.parametrize("name", ["Adagrad", "Rprop", "Adamax", "Adam"])
def test_grown_weights_have_fresh_state_on_the_compressed_backend(name):
    model = _model()
    sp = _sparsifier("rigl", name, model, backend="sparse")
    for t in range(5):
        old = [w.topology_state() for w in sp.weights]
        _step(model, sp, t)
        for weight, before in zip(sp.weights, old, strict=True):
            grown = ~torch.isin(weight.topology_state(), before)
            for key, (value, fresh) in _weight_states(sp, weight).items():
                assert torch.all(value[grown] == fresh), key
    assert sp.update_count == 2
