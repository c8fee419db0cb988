"""Switching layers between masked-dense ``nn.Linear`` and the compressed layers:
``SparseLinear`` (any pattern) or ``CondensedLinear`` (the same count in every row)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl.config import ConfigError
from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.sparse.condensed import CondensedLinear
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
    layout: str | None = None,
    nm: str | tuple[int, int] | None = None,
) -> tuple[SparseWeight, Target]:
    """Replace the ``nn.Linear`` of ``target`` by a compressed layer with the active set
    ``topology``: a bool mask of the weight's shape or flat indices ``row * in + col``.

    ``layout="csr"`` builds a ``SparseLinear``; ``layout="condensed"`` a
    ``CondensedLinear``, for a topology with the same count in every row (a fan-in or N:M
    pattern; ``nm="N:M"`` also checks N in every group of M), else a ConfigError naming
    the layer.

    A materialised layer gives its active weights ``weight[mask]``, and the bias stays the
    same Parameter object. A layer on the ``meta`` device (one whose dense form need not
    fit in memory) is created from its shapes: values and bias drawn from ``generator`` as
    ``nn.Linear`` draws them, U(-1/sqrt(in), 1/sqrt(in)). The optimizer is pointed at the
    new parameters (its state for the old ones is dropped).

    ``pattern`` (:mod:`rigl.patterns`) is the structure the topology keeps; it picks the
    layout when ``layout`` is None: fan-in and N:M layers (the same count in every row)
    are condensed, every other pattern is CSR. Both layers offer the same interface to
    :class:`rigl.sparse.storage.SparseWeight`.
    """
    if layout is None:
        layout = "condensed" if pattern.kind in ("fanin", "nm") else "csr"
        if pattern.kind == "nm":
            nm = (pattern.n, pattern.m)
    if layout not in ("csr", "condensed"):
        raise ConfigError(f"layout={layout!r}; allowed: 'csr', 'condensed'")
    linear = target.module
    try:
        if linear.weight.is_meta:
            flat = (
                topology.reshape(-1).nonzero().squeeze(1)
                if topology.dtype == torch.bool
                else topology
            )
            layer = _from_shapes(linear, flat, generator, layout, nm)
            _swap_in_optimizer(optimizer, linear.bias, layer.bias)
        else:  # the dense weight exists already, so a dense bool mask costs nothing extra
            layer = _from_dense(linear, topology, layout, nm)
    except ValueError as err:  # a topology the condensed layout cannot hold
        raise ConfigError(f"{target.name}: {err}; use layout='csr' for this layer") from None
    module_name = target.name.rpartition(".")[0]
    _replace_module(model, module_name, layer)
    _swap_in_optimizer(optimizer, linear.weight, layer.values)
    kind = type(layer).__name__
    return SparseWeight(target.name, layer, pattern), Target(target.name, layer, "values", kind)


def _from_dense(
    linear: nn.Linear, topology: Tensor, layout: str, nm: str | tuple[int, int] | None
) -> SparseLinear | CondensedLinear:
    mask = topology
    if topology.dtype != torch.bool:
        mask = torch.zeros(linear.weight.numel(), dtype=torch.bool)
        mask[topology] = True
    device = linear.weight.device
    mask = mask.reshape(linear.weight.shape).to(device)
    if layout == "condensed":
        layer = CondensedLinear.from_dense(linear, mask, nm)
    else:
        layer = SparseLinear.from_dense(linear, mask)
    layer = layer.to(device)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def _from_shapes(
    linear: nn.Linear,
    flat: Tensor,
    generator: torch.Generator | None,
    layout: str = "csr",
    nm: str | tuple[int, int] | None = None,
) -> SparseLinear | CondensedLinear:
    """A compressed layer for a meta ``nn.Linear``: O(nnz + out) memory, never out * in."""
    n_in, n_out = linear.in_features, linear.out_features
    dtype = linear.weight.dtype
    if layout == "condensed":
        layer = CondensedLinear.unset(n_in, n_out, linear.bias is not None, nm=nm, dtype=dtype)
    else:
        layer = SparseLinear(n_in, n_out, linear.bias is not None, density=0.0, dtype=dtype)
    bound = 1.0 / math.sqrt(n_in) if n_in else 0.0
    values = torch.empty(flat.numel(), dtype=dtype).uniform_(-bound, bound, generator=generator)
    layer.set_topology(flat, values)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every ``SparseLinear`` and ``CondensedLinear`` of ``model`` by an equivalent
    ``nn.Linear`` (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear | CondensedLinear):
            dense = module.to_dense().to(module.values.device)
            if module.bias is not None:
                dense.bias = module.bias
            _replace_module(model, name, dense)
    return model
