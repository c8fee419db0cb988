"""The three products of a sparse linear layer, compiled (C++/OpenMP) or stock torch.

Activations are feature-major ("transposed"): ``xt`` is ``(in, B)``, ``yt`` is
``(out, B)``, so that the inner loops of the kernels run over the batch, contiguously.

- :func:`forward`:  ``yt = W @ xt + bias[:, None]``
- :func:`backward`: ``dxt = W^T @ dyt`` and ``dW = (dyt @ xt^T)`` at the active entries only
  (SDDMM), fused in one pass over the CSC index.

The compiled kernels are built on first use with ``torch.utils.cpp_extension.load``
(g++ with OpenMP, cached under the torch extensions directory). If the build fails, a
warning is issued once and the torch fallback (``torch.sparse`` CSR products) is used.
``RIGL_SPARSE_KERNELS=torch`` forces the fallback, ``=cpp`` makes a build failure an error.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rigl.errors import warn
from rigl.sparse.index import SparseIndex

_SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"
_ENV = "RIGL_SPARSE_KERNELS"
_ext: ModuleType | None = None
_tried = False


def _machine_tag() -> str:
    """Short hash of the CPU flags: -march=native builds must not be shared across CPUs."""
    try:
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")),
            "",
        )
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=f"rigl_sparse_linear_{_machine_tag()}",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def extension() -> ModuleType | None:
    """The compiled kernels, or None when they are disabled or failed to build."""
    global _ext, _tried
    if _tried:
        return _ext
    _tried = True
    mode = os.environ.get(_ENV, "auto").lower()
    if mode not in ("auto", "cpp", "torch"):
        raise ValueError(f"{_ENV}={mode!r}; allowed: 'auto', 'cpp', 'torch'")
    if mode == "torch":
        return None
    try:
        _ext = _build()
    except Exception as err:  # any build or load failure falls back to torch
        if mode == "cpp":
            raise
        warn(
            f"rigl.sparse: compiling the C++ kernels failed ({type(err).__name__}: {err}); "
            "using the slower torch.sparse fallback",
            RuntimeWarning,
        )
    return _ext


def backend() -> str:
    """``"cpp"`` (compiled kernels) or ``"torch"`` (torch.sparse fallback)."""
    return "cpp" if extension() is not None else "torch"


def forward(
    values: Tensor, index: SparseIndex, xt: Tensor, bias: Tensor | None, *, use: str | None = None
) -> Tensor:
    """``yt (out, B) = W @ xt + bias``; ``xt`` is ``(in, B)`` contiguous."""
    ext = _pick(use)
    if ext is not None:
        return ext.forward(values, index.row_ptr, index.col_idx, xt, bias)
    yt = torch.mm(_csr(index.row_ptr, index.col_idx, values, index.shape), xt)
    if bias is not None:
        yt += bias[:, None]
    return yt


def backward(
    values: Tensor,
    index: SparseIndex,
    xt: Tensor,
    dyt: Tensor,
    want_dx: bool = True,
    want_dw: bool = True,
    *,
    use: str | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dxt (in, B), dW values (nnz,))``; either is None when not wanted."""
    ext = _pick(use)
    if ext is not None:
        dxt, dw = ext.backward(
            values,
            index.col_ptr,
            index.n_blocks,
            index.row_idx,
            index.perm,
            xt,
            dyt,
            want_dx,
            want_dw,
        )
        return (dxt if want_dx else None), (dw if want_dw else None)
    dxt = dw = None
    n_in = index.shape[1]
    if want_dx:  # one CSR of W_b^T per row block b
        dxt = torch.zeros(n_in, dyt.shape[1], dtype=dyt.dtype)
        col_ptr = index.col_ptr.reshape(index.n_blocks, n_in + 1)
        bounds = index.block_rows.tolist()
        for b, (r0, r1) in enumerate(itertools.pairwise(bounds)):
            ptr = col_ptr[b]
            k0, k1 = int(ptr[0]), int(ptr[-1])
            rows = index.row_idx[k0:k1] - r0
            vals = values[index.perm[k0:k1].to(torch.int64)]
            dxt += torch.mm(_csr(ptr - k0, rows, vals, (n_in, r1 - r0)), dyt[r0:r1])
    if want_dw:
        pattern = _csr(index.row_ptr, index.col_idx, torch.zeros_like(values), index.shape)
        dw = torch.sparse.sampled_addmm(pattern, dyt, xt.t(), beta=0.0).values()
    return dxt, dw


def transpose(a: Tensor, *, use: str | None = None) -> Tensor:
    """``a.t()`` as a contiguous tensor (a no-op view when it already is one)."""
    at = a.t()
    if at.is_contiguous():
        return at
    ext = _pick(use)
    if ext is not None and a.is_contiguous():
        return ext.transpose(a)
    return at.contiguous()


def _csr(ptr: Tensor, idx: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": we know, and rely on it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(ptr, idx, values, shape, check_invariants=False)


def _pick(use: str | None) -> ModuleType | None:
    if use is None:
        return extension()
    if use == "torch":
        return None
    if use == "cpp":
        ext = extension()
        if ext is None:
            raise RuntimeError("the compiled rigl.sparse kernels are not available")
        return ext
    raise ValueError(f"use={use!r}; allowed: None, 'cpp', 'torch'")
