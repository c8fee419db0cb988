"""Bad input raises a ConfigError naming the argument, the value and what is allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rigl
from conftest import TinyCNN, TinyMLP, make_optimizer


def _create(method="rigl", model=None, **kwargs):
    model = model or TinyMLP()
    return rigl.create(
        method, model, make_optimizer("sgd", model), **{"total_steps": 1000, **kwargs}
    )


@pytest.mark.parametrize("value", [1.5, 1.0, -0.1, float("nan"), "0.9", True])
def test_bad_sparsity(value):
    with pytest.raises(rigl.ConfigError, match=r"sparsity=.*\[0, 1\)"):
        _create(sparsity=value)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(rigl.ConfigError, match="method='magic'.*rigl.*set"):
        _create("magic")


def test_unknown_distribution():
    with pytest.raises(rigl.ConfigError, match="distribution='gaussian'.*erk"):
        _create(distribution="gaussian")


def test_model_with_nothing_to_sparsify():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(rigl.ConfigError, match="nothing to sparsify"):
        rigl.create("rigl", model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def test_custom_sparsity_naming_a_missing_layer():
    with pytest.raises(rigl.ConfigError, match="'encoder.weight'.*valid names: fc1.weight"):
        _create(custom_sparsity={"encoder.weight": 0.5})


def test_end_step_before_begin_step():
    with pytest.raises(rigl.ConfigError, match="end_step=10 is before begin_step=50"):
        _create(begin_step=50, end_step=10)


def test_fractional_end_without_total_steps():
    model = TinyMLP()
    with pytest.raises(rigl.ConfigError, match="total_steps is needed"):
        rigl.create("rigl", model, make_optimizer("sgd", model), end_step=0.75)


def test_unknown_keyword():
    with pytest.raises(rigl.ConfigError, match="unknown option.*'sparsty'"):
        _create(sparsty=0.9)


def test_bad_schedule_values():
    with pytest.raises(rigl.ConfigError, match="update_interval=0"):
        _create(update_interval=0)
    with pytest.raises(rigl.ConfigError, match="drop_fraction=1.5"):
        _create(drop_fraction=1.5)
    with pytest.raises(rigl.ConfigError, match="decay='exp'"):
        _create(decay="exp")


def test_state_dict_from_a_different_model():
    source = _create(model=TinyCNN())
    target = _create(model=TinyMLP())
    with pytest.raises(rigl.ConfigError, match="does not belong to this model"):
        target.load_state_dict(source.state_dict())
    with pytest.raises(rigl.ConfigError, match="saved by method 'rigl'"):
        _create("set").load_state_dict(target.state_dict())
    with pytest.raises(rigl.ConfigError, match="not a rigl sparsifier state"):
        target.load_state_dict({"weights": 1})


def test_state_dict_with_wrong_shapes():
    small, big = nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(8, 4))
    state = _create(model=small, sparsity=0.5).state_dict()
    with pytest.raises(rigl.ConfigError, match=r"has shape \(4, 4\).*\(4, 8\)"):
        _create(model=big, sparsity=0.5).load_state_dict(state)


def test_parameters_missing_from_the_optimizer():
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.fc1.parameters(), lr=0.1)
    with pytest.raises(rigl.ConfigError, match="not in the optimizer"):
        rigl.create("rigl", model, optimizer, total_steps=1000)


def test_config_round_trips_through_json():
    config = rigl.SparsityConfig(
        sparsity=0.95, distribution="er", first_layer_dense=True, exclude=("out.*",)
    )
    assert rigl.SparsityConfig.from_json(config.to_json()) == config
    with pytest.raises(rigl.ConfigError, match="unknown sparsity config keys"):
        rigl.SparsityConfig.from_dict({"sparsity": 0.5, "colour": "red"})


# -- numbers: one check for every argument (numpy scalars in, bool/NaN/inf/str out) -------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": "abc"}, "seed='abc' must be an int"),
        ({"seed": 1.7}, "seed=1.7 must be an int"),
        ({"seed": True}, "seed=True must be an int"),
        ({"total_steps": 10.0}, "total_steps=10.0 must be an int >= 1"),
        ({"update_interval": "5"}, "update_interval='5' must be an int >= 1"),
        ({"update_interval": 2.5}, "update_interval=2.5 must be an int >= 1"),
        ({"begin_step": "10"}, "begin_step='10' must be a step"),
        ({"end_step": float("nan")}, "end_step=nan must be a finite number"),
        ({"end_step": float("inf")}, "end_step=inf must be a finite number"),
        ({"sparsity": float("inf")}, r"sparsity=inf must be a finite number in \[0, 1\)"),
        ({"drop_fraction": float("nan")}, r"drop_fraction=nan must be a finite number in \[0, 1\]"),
        ({"drop_fraction": "0.3"}, "drop_fraction='0.3' must be a number"),
        ({"erk_power": float("inf")}, "erk_power=inf must be a finite number >= 0"),
        ({"custom_sparsity": {"fc1.*": float("nan")}}, r"custom_sparsity\['fc1.\*'\]=nan"),
        ({"grow_candidates": float("inf")}, "grow_candidates=inf must be a finite number >= 1"),
    ],
)
def test_bad_numbers_are_config_errors(kwargs, match):
    with pytest.raises(rigl.ConfigError, match=match):
        _create(**kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("snfs", {"momentum": "0.9"}, r"momentum='0.9' must be a number in \[0, 1\)"),
        ("snfs", {"momentum": float("nan")}, "momentum=nan must be a finite number"),
        ("gmp", {"update_interval": "5"}, "update_interval='5' must be an int >= 1"),
        ("gmp", {"update_interval": 2.5}, "update_interval=2.5 must be an int >= 1"),
        ("gmp", {"begin_step": 1.5}, "begin_step=1.5"),
    ],
)
def test_bad_method_numbers_are_config_errors(method, kwargs, match):
    with pytest.raises(rigl.ConfigError, match=match):
        _create(method, **kwargs)


def test_numpy_scalars_are_numbers():
    sp = _create(
        sparsity=np.float32(0.9),
        drop_fraction=np.float64(0.3),
        update_interval=np.int64(10),
        end_step=np.float32(0.5),
        total_steps=np.int32(100),
        seed=np.int64(3),
        erk_power=np.float32(1.0),
        custom_sparsity={"out.weight": np.float32(0.5)},
    )
    assert sp.config.sparsity == pytest.approx(0.9) and type(sp.config.sparsity) is float
    assert sp.schedule.update_interval == 10 and sp.schedule.end_step == 50 and sp.seed == 3
    assert rigl.SparsityConfig.from_json(sp.config.to_json()) == sp.config  # plain JSON
    snfs = _create("snfs", momentum=np.float32(0.5))
    assert snfs.momentum == 0.5
    assert rigl.layer_sparsities([(4, 4)], np.float32(0.5), "erk") == [0.5]
