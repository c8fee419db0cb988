"""Model size of sparse networks, and the width multipliers of the paper's baselines.

Storage (:func:`model_size`), per weight of shape ``(rows, *rest)`` with ``nnz`` non-zeros,
values of ``value_bytes`` (4 for float32) and indices of ``index_bytes`` (4 for int32):

- dense: ``numel * value_bytes``
- CSR (the matrix ``rows x prod(rest)``): ``nnz * (value_bytes + index_bytes)`` values and
  column indices, plus ``(rows + 1) * index_bytes`` row pointers
- bitmask (the MicroNet counter of the official RigL README's "Model Size" column):
  ``nnz * value_bytes + ceil(numel / 8)``

Sparse layers (density < 1) are stored in CSR in ``SizeReport.sparse_bytes``; dense
layers, biases and norm parameters are stored dense.

Width solvers for the baselines of Evci et al. 2020: Small-Dense (a narrower dense net
with the parameter count of the sparse one) and Big-Sparse (a wider sparse net with the
FLOPs of the dense one). Models are built on the ``meta`` device, so solving for
ResNet-50 takes a few seconds and no memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rigl.flops import count_flops

__all__ = [
    "LayerSize",
    "SizeReport",
    "big_sparse_width",
    "model_size",
    "small_dense_width",
    "width_for_params",
]


@dataclass(frozen=True)
class LayerSize:
    name: str
    shape: tuple[int, ...]
    density: float
    params: int
    active_params: int
    dense_bytes: int
    csr_bytes: int
    bitmask_bytes: int


@dataclass(frozen=True)
class SizeReport:
    """Weights (parameters with >= 2 dims or named in ``densities``) and the rest."""

    layers: tuple[LayerSize, ...]
    other_params: int  # biases, norm scales and shifts: always dense
    value_bytes: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers) + self.other_params

    @property
    def active_params(self) -> int:
        return sum(r.active_params for r in self.layers) + self.other_params

    @property
    def dense_bytes(self) -> int:
        return self.params * self.value_bytes

    @property
    def sparse_bytes(self) -> int:
        """Sparse layers in CSR, everything else dense."""
        weights = sum(r.csr_bytes if r.density < 1 else r.dense_bytes for r in self.layers)
        return weights + self.other_params * self.value_bytes

    @property
    def bitmask_bytes(self) -> int:
        weights = sum(r.bitmask_bytes if r.density < 1 else r.dense_bytes for r in self.layers)
        return weights + self.other_params * self.value_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "params": self.params,
            "active_params": self.active_params,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "bitmask_bytes": self.bitmask_bytes,
        }


def model_size(
    model: nn.Module,
    densities: Mapping[str, float] | None = None,
    *,
    value_bytes: int = 4,
    index_bytes: int = 4,
) -> SizeReport:
    """Parameters and bytes of ``model`` with the given per-weight densities."""
    densities = dict(densities or {})
    named = dict(model.named_parameters())
    unknown = sorted(set(densities) - set(named))
    if unknown:
        raise ValueError(f"densities name parameters that {type(model).__name__} lacks: {unknown}")
    layers, other = [], 0
    for name, p in named.items():
        if p.dim() < 2 and name not in densities:
            other += p.numel()
            continue
        d = float(densities.get(name, 1.0))
        numel, nnz = p.numel(), round(d * p.numel())
        rows = p.shape[0] if p.dim() else 1
        csr = nnz * (value_bytes + index_bytes) + (rows + 1) * index_bytes
        bitmask = nnz * value_bytes + math.ceil(numel / 8)
        layers.append(
            LayerSize(name, tuple(p.shape), d, numel, nnz, numel * value_bytes, csr, bitmask)
        )
    return SizeReport(tuple(layers), other, value_bytes)


def _on_meta(build_fn: Callable[[float], nn.Module], width: float) -> nn.Module:
    with torch.device("meta"):
        return build_fn(width)


def _bisect(
    value: Callable[[float], float], target: float, lo: float, hi: float, tol: float
) -> float:
    """The width in [lo, hi] whose (non-decreasing, step-wise) ``value`` is closest to target."""
    v_lo, v_hi = value(lo), value(hi)
    if target <= v_lo:
        return lo
    if target >= v_hi:
        return hi
    while hi - lo > tol:  # invariant: value(lo) < target <= value(hi)
        mid = (lo + hi) / 2
        v_mid = value(mid)
        if v_mid < target:
            lo, v_lo = mid, v_mid
        else:
            hi, v_hi = mid, v_mid
    return lo if target - v_lo <= v_hi - target else hi


def width_for_params(
    build_fn: Callable[[float], nn.Module],
    target_params: float,
    densities_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    *,
    lo: float = 0.01,
    hi: float = 8.0,
    tol: float = 1e-4,
) -> float:
    """Width multiplier whose model has ``target_params`` active parameters.

    ``build_fn(width)`` builds the model (e.g. ``lambda w: build_model("resnet50", ...,
    width=w)``); ``densities_fn(model)`` gives its densities (None: dense). Channel counts
    are rounded inside ``build_fn``, so the count is a step function of the width; the
    width returned is the one, to ``tol``, whose count is nearest the target.
    """

    def params(width: float) -> float:
        model = _on_meta(build_fn, width)
        densities = densities_fn(model) if densities_fn is not None else None
        return model_size(model, densities).active_params

    return _bisect(params, target_params, lo, hi, tol)


def small_dense_width(
    build_fn: Callable[[float], nn.Module],
    target_params: float,
    *,
    lo: float = 0.01,
    hi: float = 1.0,
    tol: float = 1e-4,
) -> float:
    """Width of the Small-Dense baseline: a dense model with ``target_params`` parameters.

    ``target_params`` is typically ``model_size(model, densities).active_params`` of the
    sparse model (biases and norm parameters included on both sides).
    """
    return width_for_params(build_fn, target_params, None, lo=lo, hi=hi, tol=tol)


def big_sparse_width(
    build_fn: Callable[[float], nn.Module],
    example_input: torch.Tensor,
    target_flops: float,
    densities_fn: Callable[[nn.Module], Mapping[str, float]],
    *,
    lo: float = 1.0,
    hi: float = 8.0,
    tol: float = 1e-3,
    convention: str = "macs",
) -> float:
    """Width multiplier whose sparse model costs ``target_flops`` per example (Big-Sparse).

    ``densities_fn(model)`` gives the densities of the wider model, e.g.
    ``lambda m: rigl.layer_densities(m, 0.9, "erk")``; ``target_flops`` is typically the
    dense model's ``count_flops(...).flops_dense``. (The paper's Big-Sparse MobileNets
    instead match the dense parameter count, giving 0.98x / 1.91x FLOPs for uniform / ERK
    at 75%: that width is ``width_for_params(build_fn, dense_params, densities_fn)``.)
    """
    x = example_input.to("meta")

    def flops(width: float) -> float:
        model = _on_meta(build_fn, width)
        return count_flops(model, x, densities_fn(model), convention=convention).flops_sparse

    return _bisect(flops, target_flops, lo, hi, tol)
