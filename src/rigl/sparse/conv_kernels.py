"""The products of a compressed sparse convolution, compiled (C++/OpenMP) or stock torch.

The weight is the kernel ``(out, in, kh, kw)`` viewed as the matrix ``(out, in*kh*kw)`` on a
:class:`~rigl.sparse.index.SparseIndex`; activations are NCHW (a 1-D convolution is a 2-D one
with ``kh = 1`` and a height of one).

- :func:`forward`:  ``y = conv(x, W) + bias``
- :func:`backward`: ``dx = conv_transpose(dy, W)`` and ``dW`` at the active entries only,
  in one pass over the images.

The compiled kernels (``csrc/sparse_conv.cpp``) are a direct sparse convolution vectorised
over the batch: each call copies its operands into blocks of 8 images (the vector lanes)
and every active weight adds one shifted input vector per output position, so no unfolded
``(in*kh*kw, N*Ho*Wo)`` matrix is ever built (docs/design.md says why). They are
built and cached as the linear kernels are, and follow the same choice: when
:mod:`rigl.sparse.kernels` runs on its torch fallback (``RIGL_SPARSE_KERNELS=torch``, a
failed build) or on another device, so does this module; its fallback densifies the
weight and calls torch's convolutions. float32/float64 are computed as stored, bfloat16
and float16 in float32, the results rounded once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from rigl.errors import warn
from rigl.sparse import kernels
from rigl.sparse.index import SparseIndex

_SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_conv.cpp"
_ext: ModuleType | None = None
_tried = False


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, zero padding and dilation, each (height, width)."""

    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(
                (h, w), self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def ext_args(self) -> list[int]:
        return [*self.kernel, *self.stride, *self.dilation, *self.padding]


def extension() -> ModuleType | None:
    """The compiled convolution kernels, or None where the linear ones are not used either
    (or this source failed to build: a warning, then the fallback)."""
    global _ext, _tried
    if kernels.extension() is None:
        return None
    if not _tried:
        _tried = True
        try:
            _ext = kernels.build_source(_SOURCE, "rigl_sparse_conv")
        except Exception as err:  # any build or load failure falls back to torch
            if os.environ.get("RIGL_SPARSE_KERNELS", "auto").lower() == "cpp":
                raise
            warn(
                f"rigl.sparse: compiling the C++ convolution kernels failed "
                f"({type(err).__name__}: {err}); using the slower torch fallback",
                RuntimeWarning,
            )
    return _ext


def _pick(use: str | None, device: torch.device) -> ModuleType | None:
    if kernels._pick(use, device) is None:  # the same choice (and errors) as the linear layer
        return None
    ext = extension()
    if ext is None and use == "cpp":
        raise RuntimeError("the compiled rigl.sparse convolution kernels are not available")
    return ext


def check_operands(
    values: Tensor,
    index: SparseIndex,
    x: Tensor,
    geom: ConvGeometry,
    dy: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """ValueError naming the operand unless each fits the index ``(out, in*kh*kw)``:
    ``x`` (N, in, H, W), ``dy`` (N, out, Ho, Wo), ``bias`` (out,), one dtype and device."""
    kernels.check_operands(values, index, values.new_empty(index.shape[1], 0), bias=bias)
    n_out, n_cols = index.shape
    kh, kw = geom.kernel
    if x.dim() != 4 or x.shape[1] * kh * kw != n_cols:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; the weight has {n_cols // (kh * kw)} "
            "input channels (N, C, H, W expected)"
        )
    if min(geom.out_size(x.shape[2], x.shape[3])) < 1:
        raise ValueError(f"x of shape {tuple(x.shape)} is smaller than the kernel {geom}")
    for name, t in (("x", x), ("dy", dy)):
        if t is not None and (t.dtype != values.dtype or t.device != values.device):
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}, values {values.dtype} on {values.device}"
            )
    if dy is not None:
        expected = (x.shape[0], n_out, *geom.out_size(x.shape[2], x.shape[3]))
        if tuple(dy.shape) != expected:
            raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {expected}")


def _computed(t: Tensor | None) -> Tensor | None:
    return kernels._computed(t)


def forward(
    values: Tensor,
    index: SparseIndex,
    x: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
    *,
    use: str | None = None,
) -> Tensor:
    """``y (N, out, Ho, Wo) = conv(x, W) + bias`` with ``x`` (N, in, H, W)."""
    check_operands(values, index, x, geom, bias=bias)
    dtype = values.dtype
    values, x, bias = _computed(values), _computed(x), _computed(bias)
    ext = _pick(use, values.device)
    if ext is not None:
        y = ext.forward(values, index.row_ptr, index.col_idx, x, bias, geom.ext_args())
        return y.to(dtype)
    with kernels._no_autocast(values.device):
        y = F.conv2d(x, _dense(values, index, geom), bias, geom.stride, geom.padding, geom.dilation)
    return y.to(dtype)


def backward(
    values: Tensor,
    index: SparseIndex,
    x: Tensor,
    dy: Tensor,
    geom: ConvGeometry,
    want_dx: bool = True,
    want_dw: bool = True,
    *,
    use: str | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dx (N, in, H, W), dW values (nnz,))``; either is None when not wanted."""
    check_operands(values, index, x, geom, dy)
    dtype = values.dtype
    values, x, dy = _computed(values), _computed(x), _computed(dy)
    ext = _pick(use, values.device)
    if ext is not None:
        dx, dw = ext.backward(
            values, index.row_ptr, index.col_idx, x, dy, geom.ext_args(), want_dx, want_dw
        )
    else:
        with kernels._no_autocast(values.device):
            dx, dw = _backward_torch(values, index, x, dy, geom, want_dx, want_dw)
    dx = dx.to(dtype).contiguous() if want_dx else None
    return dx, (dw.to(dtype) if want_dw else None)


def _dense(values: Tensor, index: SparseIndex, geom: ConvGeometry) -> Tensor:
    n_out, n_cols = index.shape
    dense = values.new_zeros(n_out * n_cols).index_put((index.flat().to(values.device),), values)
    return dense.view(n_out, n_cols // (geom.kernel[0] * geom.kernel[1]), *geom.kernel)


def _backward_torch(values, index, x, dy, geom, want_dx, want_dw):
    args = (geom.stride, geom.padding, geom.dilation)
    weight = _dense(values, index, geom)
    dx = torch.nn.grad.conv2d_input(x.shape, weight, dy, *args) if want_dx else None
    dw = None
    if want_dw:
        dense = torch.nn.grad.conv2d_weight(x, weight.shape, dy, *args)
        dw = dense.reshape(-1)[index.flat().to(dense.device)]
    return dx, dw
