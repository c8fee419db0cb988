"""The autograd function of a compressed sparse linear layer, ``y = x W^T + b``.

:func:`sparse_linear` is its functional form (``SparseLinear`` calls the same path). Before
any kernel runs, the input is checked as ``nn.Linear`` checks it (:func:`check_input`, the
same errors) and, in an autocast region, cast as ``nn.Linear``'s operands are cast.
The backward pass returns the gradient of the active weights only, ``(nnz,)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rigl.sparse import condensed_ops, kernels
from rigl.sparse.condensed_ops import CondensedIndex
from rigl.sparse.index import SparseIndex


class GrowInputs:
    """Every ``(xt, dyt)`` of the backward calls of one step, kept only while a grow step
    needs them: with gradient accumulation (several backward calls before one optimizer
    step) the grow score is the accumulated gradient ``sum_i dyt_i @ xt_i^T``."""

    def __init__(self) -> None:
        self.enabled = False
        self.xts: list[Tensor] = []
        self.dyts: list[Tensor] = []

    def clear(self) -> None:
        self.xts, self.dyts = [], []


def check_input(x: Tensor, values: Tensor, shape: tuple[int, int]) -> None:
    """Raise the error ``nn.Linear`` raises for an input ``x`` (``..., in``) it cannot take:
    the compiled kernels would read past a narrow input, ignore a wide one's last features,
    or reinterpret another dtype's bytes."""
    n_out, n_in = shape
    if x.dim() == 0:
        raise RuntimeError(
            "both arguments to linear need to be at least 1D, but they are 0D and 2D"
        )
    if x.shape[-1] != n_in:
        rows = math.prod(x.shape[:-1])
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({rows}x{x.shape[-1]} and {n_in}x{n_out})"
        )
    if x.dtype != values.dtype:
        raise RuntimeError(
            "mat1 and mat2 must have the same dtype, but got "
            f"{_scalar_name(x.dtype)} and {_scalar_name(values.dtype)}"
        )
    if x.device != values.device:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            f"{x.device} and {values.device}!"
        )


def _scalar_name(dtype: torch.dtype) -> str:
    """torch's own name of a dtype, as in its error messages ("Float", "BFloat16", "Long")."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def _autocast(x: Tensor, values: Tensor, bias: Tensor | None) -> tuple:
    """The casts autocast makes for ``nn.Linear``: in an autocast region of ``x``'s device,
    floating operands other than float64 are computed in the autocast dtype. The casts are
    differentiable, so float32 parameters get float32 gradients."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (meta)
        enabled = False
    if not enabled:
        return x, values, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t: Tensor | None) -> Tensor | None:
        eligible = t is not None and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(values), cast(bias)


def apply_sparse_linear(x, values, bias, index, grow, use) -> Tensor:
    """The one entry of :func:`sparse_linear` and ``SparseLinear.forward``: autocast's casts
    (differentiable, outside the function), then :class:`SparseLinearFunction`."""
    x, values, bias = _autocast(x, values, bias)
    return SparseLinearFunction.apply(x, values, bias, index, grow, use)


def _products(index: SparseIndex | CondensedIndex):
    """The module with ``forward`` and ``backward`` products for this kind of index."""
    return condensed_ops if isinstance(index, CondensedIndex) else kernels


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` given by ``values`` on a :class:`SparseIndex` (CSR) or
    a :class:`~rigl.sparse.condensed_ops.CondensedIndex` (constant fan-in)."""

    @staticmethod
    def forward(ctx, x, values, bias, index, grow, use):  # type: ignore[override]
        check_input(x, values, index.shape)
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), x.shape[-1])  # not -1: a layer may have no inputs
        xt = kernels.to_panels(x2, use=use)  # (in, B), or (panels, in, width) for a big B
        ctx.save_for_backward(xt, values)
        ctx.index, ctx.grow, ctx.use, ctx.lead = index, grow, use, lead
        ctx.has_bias = bias is not None
        products = _products(index)
        if xt.dim() == 3:  # panels: the output row-major, as nn.Linear's is
            y = products.forward(values, index, xt, bias, use=use, rows=x2.shape[0])
            return y.reshape(*lead, y.shape[1])
        yt = products.forward(values, index, xt, bias, use=use)  # (out, B)
        # A leaf input keeps its gradient in its own (row-major) layout; anything else
        # takes the feature-major view, which the layer before reads without a copy.
        ctx.dx_row_major = x.is_leaf
        return yt.t().reshape(*lead, yt.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xt, values = ctx.saved_tensors
        dy2 = dy.reshape(math.prod(ctx.lead), dy.shape[-1])  # (B, out); out may be 0
        panels = xt.dim() == 3
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        db = None
        if panels and want_db:  # xt's panels, and the bias gradient in the same pass
            dyt, db = kernels.to_panels_and_sums(dy2, xt.shape[2], use=ctx.use)
        elif panels:
            dyt = kernels.to_panels(dy2, xt.shape[2], use=ctx.use)
        else:
            dyt = kernels.transpose(dy2, use=ctx.use)  # (out, B)
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        products = _products(ctx.index)
        rows = dy2.shape[0] if panels else None  # panels: dx comes back row-major
        dxt, dw = products.backward(
            values, ctx.index, xt, dyt, want_dx, want_dw, use=ctx.use, rows=rows
        )
        if ctx.grow is not None and ctx.grow.enabled:
            ctx.grow.xts.append(xt)
            ctx.grow.dyts.append(dyt)
        dx = None
        if dxt is not None:
            if panels:
                dx = dxt
            else:
                dx = kernels.transpose(dxt, use=ctx.use) if ctx.dx_row_major else dxt.t()
            dx = dx.reshape(*ctx.lead, xt.shape[-2])
        if want_db and db is None:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


def sparse_linear(
    x: Tensor,
    values: Tensor,
    index: SparseIndex | CondensedIndex,
    bias: Tensor | None = None,
    use: str | None = None,
) -> Tensor:
    """Functional form: ``use`` = None (best available), ``"cpp"`` or ``"torch"``."""
    return apply_sparse_linear(x, values, bias, index, None, use)
