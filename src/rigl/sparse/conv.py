"""``SparseConv2d`` / ``SparseConv1d``: convolutions whose kernel is stored compressed.

A convolution is a linear map of the unfolded input: its kernel ``(out, in, kh, kw)`` is
the matrix ``(out, in*kh*kw)``, stored as :class:`~rigl.sparse.SparseLinear` stores its
weight (CSR, int32, without the blocked CSC, which these kernels do not read; the
``values`` Parameter ``(nnz,)`` in flat order of that matrix). So the layers subclass
``SparseLinear``: index, topology updates, checkpoint loading, ``active_indices`` and
:meth:`grad_at` are the same, and the storage seam
(:class:`rigl.sparse.storage.SparseWeight`) drives them unchanged, Static, SET and RigL
included. Only the products differ (:mod:`rigl.sparse.conv_kernels`), and the grow
scores: the dense kernel gradient of a block of output channels, a dense convolution
weight gradient of the kept inputs and output gradients (:meth:`grad_rows`).

``groups=1`` and zero padding only (grouped, depthwise and other padding modes stay masked,
see :mod:`rigl.backends`). Activations stay NCHW.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl.sparse import conv_kernels
from rigl.sparse.conv_kernels import ConvGeometry
from rigl.sparse.function import _autocast, _scalar_name
from rigl.sparse.index import SparseIndex
from rigl.sparse.linear import SparseLinear


def _pair(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def resolve_padding(padding, kernel, dilation) -> tuple[int, ...] | None:
    """Symmetric zero padding per dimension, or None for ``'same'`` needing an uneven split."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return None if any(t % 2 for t in totals) else tuple(t // 2 for t in totals)
    return _pair(padding, len(kernel))


class SparseConvFunction(torch.autograd.Function):
    """``y = conv(x, W) + b`` with ``W`` given by ``values`` on a :class:`SparseIndex`."""

    @staticmethod
    def forward(ctx, x, values, bias, index, geom, grow, use):  # type: ignore[override]
        x = x.contiguous()
        y = conv_kernels.forward(values, index, x, bias, geom, use=use)
        ctx.save_for_backward(x, values)
        ctx.index, ctx.geom, ctx.grow, ctx.use = index, geom, grow, use
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, values = ctx.saved_tensors
        dy = dy.contiguous()
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = conv_kernels.backward(
            values, ctx.index, x, dy, ctx.geom, want_dx, want_dw, use=ctx.use
        )
        if ctx.grow is not None and ctx.grow.enabled:
            ctx.grow.xts.append(x)
            ctx.grow.dyts.append(dy)
        db = dy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


class SparseConv2d(SparseLinear):
    """An ``nn.Conv2d`` (``groups=1``, zero padding) with a compressed sparse kernel.

    Args: as ``nn.Conv2d`` (``padding`` an int, a pair, ``'valid'`` or a symmetric
    ``'same'``); ``density``: fraction of kernel weights active, drawn uniformly at random
    (use :meth:`from_dense` for a given mask).
    """

    dims = 2
    uses_csc = False  # the kernels read the CSR only: no CSC is built or stored

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        *,
        density: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        n = self.dims
        kernel, dilation = _pair(kernel_size, n), _pair(dilation, n)
        resolved = resolve_padding(padding, kernel, dilation)
        if resolved is None:
            raise ValueError(
                f"padding='same' with kernel {kernel} and dilation {dilation} pads unevenly; "
                "the compressed convolution pads symmetrically"
            )
        super().__init__(
            in_channels * math.prod(kernel),
            out_channels,
            bias,
            density=density,
            generator=generator,
            dtype=dtype,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel, _pair(stride, n)
        self.padding, self.dilation = resolved, dilation
        lead = (1,) * (2 - n)  # a 1-D convolution is a 2-D one of height one
        self.geometry = ConvGeometry(
            lead + kernel, lead + self.stride, (0,) * (2 - n) + resolved, lead + dilation
        )

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dense(cls, conv: nn.Conv2d | nn.Conv1d, mask: Tensor) -> SparseConv2d:
        """The active entries ``conv.weight[mask]`` of a dense convolution, bias copied."""
        weight = conv.weight.detach()
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        layer = cls.like(conv)
        flat = mask.reshape(-1).nonzero().squeeze(1)
        layer.set_topology(flat, weight.reshape(-1)[flat])
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    @classmethod
    def like(cls, conv: nn.Conv2d | nn.Conv1d, density: float = 0.0) -> SparseConv2d:
        """A layer of ``conv``'s shape and geometry (and dtype), ``density`` of it active."""
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            density=density,
            dtype=conv.weight.dtype,
        )

    def to_dense(self) -> nn.Conv2d | nn.Conv1d:
        """The dense convolution with the same function (inactive weights zero)."""
        kind = nn.Conv2d if self.dims == 2 else nn.Conv1d
        dense = kind(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight.detach())
            if self.bias is not None:
                dense.bias.copy_(self.bias.detach())
        return dense

    # -- properties ------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def weight(self) -> Tensor:
        """The dense kernel ``(out, in, *kernel_size)``, built on every access (see
        :attr:`SparseLinear.weight`)."""
        return super().weight.view(self.weight_shape)

    # -- grow scores (RigL) -----------------------------------------------------------
    def grad_rows(self, row_start: int, row_end: int) -> Tensor:
        """Dense ``dL/dW`` of output channels [row_start, row_end) as ``(rows, in*kh*kw)``,
        accumulated over the kept backward calls: a dense convolution weight gradient of
        the kept inputs and that block of output-gradient channels."""
        if not self._grow.xts:
            raise RuntimeError("no kept batch: call keep_grow_inputs() before backward()")
        g = self.geometry
        shape = (row_end - row_start, self.in_channels, *g.kernel)
        grad = None
        for x, dy in zip(self._grow.xts, self._grow.dyts, strict=True):
            part = torch.nn.grad.conv2d_weight(
                x, shape, dy[:, row_start:row_end], g.stride, g.padding, g.dilation
            ).reshape(shape[0], -1)
            grad = part.to(self.values.dtype) if grad is None else grad + part
        return grad

    def _grad_at(self, flat: Tensor) -> Tensor:
        index, order = SparseIndex.from_flat(flat, self.shape, csc=False)
        sorted_grad = torch.zeros(index.nnz, dtype=self.values.dtype, device=self.values.device)
        for x, dy in zip(self._grow.xts, self._grow.dyts, strict=True):
            zeros = torch.zeros(index.nnz, dtype=x.dtype, device=x.device)  # as kept
            _, dw = conv_kernels.backward(
                zeros, index, x, dy, self.geometry, False, True, use=self.kernels
            )
            sorted_grad += dw
        grad = torch.empty_like(sorted_grad)
        grad[order] = sorted_grad
        return grad

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        unbatched = x.dim() == self.dims + 1
        x4 = x.unsqueeze(0) if unbatched else x
        if self.dims == 1:
            x4 = x4.unsqueeze(2)
        x4, values, bias = _autocast(x4, self.values, self.bias)
        y = SparseConvFunction.apply(
            x4, values, bias, self._index, self.geometry, self._grow, self.kernels
        )
        if self.dims == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y

    def _check_input(self, x: Tensor) -> None:
        """The errors ``nn.Conv2d`` gives for an input it cannot take."""
        n = self.dims
        if x.dim() not in (n + 1, n + 2):
            raise RuntimeError(
                f"Expected {n + 1}D (unbatched) or {n + 2}D (batched) input to conv{n}d, but "
                f"got input of size: {list(x.shape)}"
            )
        channels = x.shape[-n - 1]
        if channels != self.in_channels:
            raise RuntimeError(
                f"Given groups=1, weight of size {list(self.weight_shape)}, expected input"
                f"{list(x.shape)} to have {self.in_channels} channels, but got {channels} "
                "channels instead"
            )
        if x.dtype != self.values.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(
                f"Input type ({_scalar_name(x.dtype)}) and weight type "
                f"({_scalar_name(self.values.dtype)}) should be the same"
            )
        for size, k, d, p in zip(
            x.shape[-n:], self.kernel_size, self.dilation, self.padding, strict=True
        ):
            if size + 2 * p < d * (k - 1) + 1:
                raise RuntimeError(
                    f"Calculated padded input size per channel: {tuple(x.shape[-n:])}. Kernel "
                    f"size: {self.kernel_size}. Kernel size can't be greater than actual input "
                    "size"
                )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, density={self.density:.4f}"
        )


class SparseConv1d(SparseConv2d):
    """An ``nn.Conv1d`` (``groups=1``, zero padding) with a compressed sparse kernel; run as
    a 2-D convolution of height one."""

    dims = 1
