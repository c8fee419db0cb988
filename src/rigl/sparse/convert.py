"""Switching layers between masked-dense ``nn.Linear`` and compressed ``SparseLinear``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl.patterns import UNSTRUCTURED, Pattern
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
    model: nn.Module,
    target: Target,
    topology: Tensor,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | None = None,
    pattern: Pattern = UNSTRUCTURED,
) -> tuple[SparseWeight, Target]:
    """Replace the ``nn.Linear`` of ``target`` by a ``SparseLinear`` with the active set
    ``topology``: a bool mask of the weight's shape or flat indices ``row * in + col``.

    A materialised layer gives its active weights ``weight[mask]``, and the bias stays the
    same Parameter object. A layer on the ``meta`` device (one whose dense form need not
    fit in memory) is created from its shapes: values and bias drawn from ``generator`` as
    ``nn.Linear`` draws them, U(-1/sqrt(in), 1/sqrt(in)). The optimizer is pointed at the
    new parameters (its state for the old ones is dropped).

    ``pattern`` (:mod:`rigl.patterns`) is the structure the topology keeps. Every pattern is
    stored in the same unstructured compressed layout today; this is where a pattern-aware
    layout plugs in (e.g. fan-in and N:M as condensed ``(out, k)`` values and column
    indices): build that layer here, and a storage for it that implements
    :class:`rigl.seam.SparseStorage`.
    """
    linear = target.module
    if linear.weight.is_meta:
        flat = (
            topology.reshape(-1).nonzero().squeeze(1) if topology.dtype == torch.bool else topology
        )
        layer = _from_shapes(linear, flat, generator)
        _swap_in_optimizer(optimizer, linear.bias, layer.bias)
    else:  # the dense weight exists already, so a dense bool mask costs nothing extra
        mask = topology
        if topology.dtype != torch.bool:
            mask = torch.zeros(linear.weight.numel(), dtype=torch.bool)
            mask[topology] = True
        device = linear.weight.device
        layer = SparseLinear.from_dense(linear, mask.reshape(linear.weight.shape).to(device))
        layer = layer.to(device)
        if linear.bias is not None:
            layer.bias = linear.bias
    module_name = target.name.rpartition(".")[0]
    _replace_module(model, module_name, layer)
    _swap_in_optimizer(optimizer, linear.weight, layer.values)
    return SparseWeight(target.name, layer, pattern), Target(
        target.name, layer, "values", "SparseLinear"
    )


def _from_shapes(
    linear: nn.Linear, flat: Tensor, generator: torch.Generator | None
) -> SparseLinear:
    """A ``SparseLinear`` for a meta ``nn.Linear``: O(nnz + out) memory, never out * in."""
    n_in, n_out = linear.in_features, linear.out_features
    dtype = linear.weight.dtype
    layer = SparseLinear(n_in, n_out, linear.bias is not None, density=0.0, dtype=dtype)
    bound = 1.0 / math.sqrt(n_in) if n_in else 0.0
    values = torch.empty(flat.numel(), dtype=dtype).uniform_(-bound, bound, generator=generator)
    layer.set_topology(flat, values)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` of ``model`` by an equivalent ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = module.to_dense().to(module.values.device)
            if module.bias is not None:
                dense.bias = module.bias
            _replace_module(model, name, dense)
    return model
