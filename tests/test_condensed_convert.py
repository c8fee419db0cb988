"""Converting nn.Linear layers to CondensedLinear, and compact checkpoints of condensed layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.sparse import CondensedLinear, SparseLinear, load_sparse, save_sparse
from rigl.sparse.condensed import random_cols
from rigl.sparse.convert import convert_linear, to_dense
from rigl.sparse.storage import SparseWeight
from rigl.targets import Target


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))


def condensed_mask(shape, k, group=None, seed=0) -> torch.Tensor:
    cols = random_cols(*shape, k, group, torch.Generator().manual_seed(seed))
    return torch.zeros(shape, dtype=torch.bool).scatter_(1, cols, True)


def convert(model, name, topology, opt=None, **kwargs):
    module = model.get_submodule(name.rpartition(".")[0])
    target = Target(name, module, "weight", "Linear")
    return convert_linear(model, target, topology, opt, torch.Generator(), **kwargs)


def test_convert_builds_a_condensed_layer_with_the_dense_weights():
    model = mlp()
    reference = mlp()
    mask = condensed_mask((12, 16), 4, group=4)  # 1:4
    with torch.no_grad():
        reference[0].weight.mul_(mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bias = model[0].bias
    weight, target = convert(model, "0.weight", mask, opt, layout="condensed", nm="1:4")
    layer = model[0]
    assert isinstance(layer, CondensedLinear) and layer.nm == (1, 4) and layer.fan_in == 4
    assert isinstance(weight, SparseWeight) and target.module_type == "CondensedLinear"
    assert layer.bias is bias and any(p is layer.values for p in opt.param_groups[0]["params"])
    x = torch.randn(5, 16)
    torch.testing.assert_close(model(x), reference(x))
    flat = mask.reshape(-1).nonzero().squeeze(1)  # flat indices work as well as a mask
    other = mlp()
    convert(other, "0.weight", flat, layout="condensed")
    assert torch.equal(other[0].weight, layer.weight)
    to_dense(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, reference[0].weight)


def test_convert_from_meta_draws_values_and_keeps_the_pattern():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 12))
    mask = condensed_mask((12, 16), 8, group=4)
    convert(model, "0.weight", mask, layout="condensed", nm="2:4")
    layer = model[0]
    assert isinstance(layer, CondensedLinear) and layer.nm == (2, 4)
    assert torch.equal(layer.weight != 0, mask)
    assert bool((layer.values.abs() <= 0.25).all())  # U(-1/sqrt(in), 1/sqrt(in))


def test_convert_refuses_a_topology_the_layout_cannot_hold():
    model = mlp()
    mask = condensed_mask((12, 16), 4)
    mask[3, mask[3].nonzero()[0]] = False
    with pytest.raises(rigl.ConfigError, match="0.weight: row 3 has 3 active inputs.*layout='csr'"):
        convert(model, "0.weight", mask, layout="condensed")
    with pytest.raises(rigl.ConfigError, match="0.weight: .*2:4 layer keeps 2 in every group"):
        convert(model, "0.weight", condensed_mask((12, 16), 8), layout="condensed", nm="2:4")
    with pytest.raises(rigl.ConfigError, match="layout='blocks'; allowed: 'csr', 'condensed'"):
        convert(model, "0.weight", mask, layout="blocks")
    assert type(model[0]) is nn.Linear  # nothing replaced
    convert(model, "0.weight", mask)  # the default CSR layout takes any topology
    assert isinstance(model[0], SparseLinear)


def test_save_and_load_condensed_layers(tmp_path):
    model = mlp()
    convert(model, "0.weight", condensed_mask((12, 16), 5), layout="condensed")
    convert(model, "2.weight", condensed_mask((8, 12), 6, group=4), layout="condensed", nm="2:4")
    path = save_sparse(model, tmp_path / "m.safetensors")
    x = torch.randn(3, 16)
    # into condensed layers of other topologies and fan-in (the count follows the file)
    other = mlp()
    convert(other, "0.weight", condensed_mask((12, 16), 2, seed=1), layout="condensed")
    convert(other, "2.weight", condensed_mask((8, 12), 6, 4, 1), layout="condensed", nm="2:4")
    load_sparse(path, other)
    assert other[0].fan_in == 5 and torch.equal(other[2].weight, model[2].weight)
    torch.testing.assert_close(other(x), model(x))
    # into CSR and dense models: the same file
    csr = mlp()
    convert(csr, "0.weight", condensed_mask((12, 16), 2, seed=1))
    load_sparse(path, csr)
    torch.testing.assert_close(csr(x), model(x))
    # a file whose rows differ cannot go into a condensed layer: refused, nothing changed
    convert(csr, "2.weight", torch.ones(8, 12, dtype=torch.bool))
    uneven = save_sparse(csr, tmp_path / "csr.safetensors")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(rigl.ConfigError, match="2.weight does not fit its CondensedLinear"):
        load_sparse(uneven, other)  # 2.weight: 12 per row, the 2:4 layer keeps 6
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_measures_count_a_condensed_model_as_its_dense_equivalent():
    from rigl.experiments.training.measures import _dense_equivalent

    model = nn.Sequential(CondensedLinear(8, 4, fan_in=2), nn.ReLU())
    dense = _dense_equivalent(model)
    assert type(dense[0]) is nn.Linear and type(model[0]) is CondensedLinear  # a copy
    assert torch.equal(dense[0].weight, model[0].weight)
