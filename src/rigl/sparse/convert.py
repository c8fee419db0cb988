"""Switching layers between masked-dense ``nn.Linear`` and compressed ``SparseLinear``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rigl.sparse.linear import SparseLinear
from rigl.sparse.storage import SparseWeight
from rigl.targets import Target


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _swap_in_optimizer(optimizer: torch.optim.Optimizer | None, old: Tensor, new: Tensor) -> None:
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    optimizer.state.pop(old, None)


def convert_linear(
    model: nn.Module, target: Target, mask: Tensor, optimizer: torch.optim.Optimizer | None
) -> tuple[SparseWeight, Target]:
    """Replace the ``nn.Linear`` of ``target`` by a ``SparseLinear`` holding ``weight[mask]``.

    The optimizer is pointed at the new ``values`` (its state for the dense weight is
    dropped); the bias stays the same Parameter object.
    """
    linear = target.module
    layer = SparseLinear.from_dense(linear, mask.to(linear.weight.device)).to(linear.weight.device)
    if linear.bias is not None:
        layer.bias = linear.bias
    module_name = target.name.rpartition(".")[0]
    _replace_module(model, module_name, layer)
    _swap_in_optimizer(optimizer, linear.weight, layer.values)
    return SparseWeight(target.name, layer), Target(target.name, layer, "values", "SparseLinear")


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` of ``model`` by an equivalent ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = module.to_dense().to(module.values.device)
            if module.bias is not None:
                dense.bias = module.bias
            _replace_module(model, name, dense)
    return model
