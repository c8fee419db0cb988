"""Switching layers between masked-dense ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` and the
compressed layers: ``SparseLinear``/``SparseConv1d``/``SparseConv2d`` (any pattern) or
``CondensedLinear`` (a Linear with the same count in every row)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from rigl.config import ConfigError
from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.sparse.condensed import CondensedLinear
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
    pattern: Pattern = UNSTRUCTURED,
    layout: str | None = None,
    nm: str | tuple[int, int] | None = None,
) -> tuple[SparseWeight, Target]:
    """Replace the ``nn.Linear`` (or ``nn.Conv1d``/``nn.Conv2d``) of ``target`` by its
    compressed form with the active set ``topology``: a bool mask of the weight's shape or
    flat indices into it (``row * in + col``; for a kernel, of ``(out, in*kh*kw)``).

    ``layout="csr"`` builds a ``SparseLinear``; ``layout="condensed"`` a
    ``CondensedLinear``, for a topology with the same count in every row (a fan-in or N:M
    pattern; ``nm="N:M"`` also checks N in every group of M), else a ConfigError naming
    the layer.

    A materialised layer gives its active weights ``weight[mask]``, and the bias stays the
    same Parameter object. A layer on the ``meta`` device (one whose dense form need not
    fit in memory) is created from its shapes: values and bias drawn from ``generator`` as
    ``nn.Linear`` and ``nn.Conv2d`` draw them, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The optimizer is pointed at the
    new parameters (its state for the old ones is dropped).

    ``pattern`` (:mod:`rigl.patterns`) is the structure the topology keeps; it picks the
    layout when ``layout`` is None: fan-in and N:M layers (the same count in every row)
    are condensed, every other pattern is CSR. Both layers offer the same interface to
    :class:`rigl.sparse.storage.SparseWeight`.
    """
    convolution = isinstance(target.module, nn.Conv1d | nn.Conv2d)
    if layout is None:  # a convolution's patterns are kept in its CSR
        layout = "condensed" if pattern.kind in ("fanin", "nm") and not convolution else "csr"
        if pattern.kind == "nm":
            nm = (pattern.n, pattern.m)
    if layout not in ("csr", "condensed"):
        raise ConfigError(f"layout={layout!r}; allowed: 'csr', 'condensed'")
    linear = target.module
    if layout == "condensed" and convolution:
        raise ConfigError(f"{target.name}: a convolution has no condensed layout; use 'csr'")
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


def _compressed_type(layer: nn.Module) -> type[SparseLinear]:
    if isinstance(layer, nn.Conv2d):
        return SparseConv2d
    return SparseConv1d if isinstance(layer, nn.Conv1d) else SparseLinear


def _from_dense(
    linear: nn.Module, topology: Tensor, layout: str, nm: str | tuple[int, int] | None
) -> SparseLinear | CondensedLinear:
    mask = topology
    if topology.dtype != torch.bool:
        mask = torch.zeros(linear.weight.numel(), dtype=torch.bool)
        mask[topology] = True
    device = linear.weight.device
    mask = mask.reshape(linear.weight.shape).to(device)
    with _global_rng_untouched():  # the layer's own draws are all overwritten here
        if layout == "condensed":
            layer = CondensedLinear.from_dense(linear, mask, nm)
        else:
            layer = _compressed_type(linear).from_dense(linear, mask)
    layer = layer.to(device)
    if linear.bias is not None:
        layer.bias = linear.bias
    return layer


def _from_shapes(
    linear: nn.Module,
    flat: Tensor,
    generator: torch.Generator | None,
    layout: str = "csr",
    nm: str | tuple[int, int] | None = None,
) -> SparseLinear | CondensedLinear:
    """The compressed layer for a meta layer: O(nnz + out) memory, never the dense size."""
    dtype = linear.weight.dtype
    with _global_rng_untouched():  # an empty layer: its bias is drawn below
        if isinstance(linear, nn.Conv1d | nn.Conv2d):
            layer = _compressed_type(linear).like(linear)
        elif layout == "condensed":
            n_in, n_out = linear.in_features, linear.out_features
            layer = CondensedLinear.unset(n_in, n_out, linear.bias is not None, nm=nm, dtype=dtype)
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


def _global_rng_untouched() -> contextlib.AbstractContextManager:
    """Draws made inside leave torch's global CPU generator as it was: converting a layer
    must not shift the dropout or data order that follows (the masked backend draws
    nothing from it either)."""
    return torch.random.fork_rng(devices=[])


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every compressed layer's entries (``values`` and its
    index buffers) replaced by its dense ``weight`` (zeros at inactive positions; the bias
    as it is): the state dict of the dense model, for files other tools load, e.g.
    ``model.save_pretrained(folder, state_dict=dense_state_dict(model))`` for a Hugging Face
    ``from_pretrained``. The model itself stays compressed (unlike :func:`to_dense`); each
    dense weight exists only in the returned dict."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear | CondensedLinear):
            continue
        prefix = f"{name}." if name else ""
        for key in module.state_dict():
            if key != "bias":
                state.pop(prefix + key, None)
        with torch.no_grad():
            state[prefix + "weight"] = module.weight.detach()
    return state


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every compressed layer of ``model`` by an equivalent dense one (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear | CondensedLinear):
            dense = module.to_dense().to(module.values.device)
            if module.bias is not None:
                dense.bias = module.bias
            _replace_module(model, name, dense)
    return model
