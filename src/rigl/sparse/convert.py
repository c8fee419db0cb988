"""Switching layers between masked-dense ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` and their
compressed forms ``SparseLinear``/``SparseConv1d``/``SparseConv2d``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl.sparse.conv import SparseConv1d, SparseConv2d
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
) -> tuple[SparseWeight, Target]:
    """Replace the ``nn.Linear`` (or ``nn.Conv1d``/``nn.Conv2d``) of ``target`` by its
    compressed form with the active set ``topology``: a bool mask of the weight's shape or
    flat indices into it (``row * in + col``; for a kernel, of ``(out, in*kh*kw)``).

    A materialised layer gives its active weights ``weight[mask]``, and the bias stays the
    same Parameter object. A layer on the ``meta`` device (one whose dense form need not
    fit in memory) is created from its shapes: values and bias drawn from ``generator`` as
    ``nn.Linear`` and ``nn.Conv2d`` draw them, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The optimizer is pointed at the
    new parameters (its state for the old ones is dropped).
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
        kind = _compressed_type(linear)
        layer = kind.from_dense(linear, mask.reshape(linear.weight.shape).to(device))
        layer = layer.to(device)
        if linear.bias is not None:
            layer.bias = linear.bias
    module_name = target.name.rpartition(".")[0]
    _replace_module(model, module_name, layer)
    _swap_in_optimizer(optimizer, linear.weight, layer.values)
    kind = type(layer).__name__
    return SparseWeight(target.name, layer), Target(target.name, layer, "values", kind)


def _compressed_type(layer: nn.Module) -> type[SparseLinear]:
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d
    return SparseConv1d if isinstance(layer, nn.Conv1d) else SparseLinear


def _from_shapes(
    linear: nn.Linear | nn.Conv1d | nn.Conv2d, flat: Tensor, generator: torch.Generator | None
) -> SparseLinear:
    """The compressed layer for a meta layer: O(nnz + out) memory, never the dense size."""
    dtype = linear.weight.dtype
    if isinstance(linear, nn.Conv1d | nn.Conv2d):
        layer = _compressed_type(linear).like(linear)
    else:
        n_in, n_out = linear.in_features, linear.out_features
        layer = SparseLinear(n_in, n_out, linear.bias is not None, density=0.0, dtype=dtype)
    n_in = layer.in_features  # fan-in: in * kh * kw for a convolution
    bound = 1.0 / math.sqrt(n_in) if n_in else 0.0
    values = torch.empty(flat.numel(), dtype=dtype).uniform_(-bound, bound, generator=generator)
    layer.set_topology(flat, values)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` by an equivalent dense one (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = module.to_dense().to(module.values.device)
            if module.bias is not None:
                dense.bias = module.bias
            _replace_module(model, name, dense)
    return model
