"""The three products of a sparse linear layer, compiled (C++/OpenMP) or stock torch.

Activations are feature-major ("transposed"): ``xt`` is ``(in, B)``, ``yt`` is
``(out, B)``, so that the inner loops of the kernels run over the batch, contiguously.

- :func:`forward`:  ``yt = W @ xt + bias[:, None]``
- :func:`backward`: ``dxt = W^T @ dyt`` and ``dW = (dyt @ xt^T)`` at the active entries only
  (SDDMM), fused in one pass over the CSC index.

Every operand is checked against the index first (:func:`check_operands`): the compiled
kernels trust shapes, dtypes and devices. float32 and float64 are computed as stored;
bfloat16 and float16 operands are computed in float32 (their products are exact there, the
sums are accumulated there) and the results rounded once to the operands' dtype.

The compiled kernels are built on first use with ``torch.utils.cpp_extension.load``
(g++ with OpenMP), once per source, flags, CPU, torch and Python (:func:`_cache_key`), into
the torch extensions directory (``TORCH_EXTENSIONS_DIR``); a line on stderr says so while
it compiles. If the build fails, a warning is issued once and the torch fallback
(``torch.sparse`` CSR products) is used. ``RIGL_SPARSE_KERNELS=torch`` forces the
fallback, ``=cpp`` makes a build failure an error.

Over 300 lines: the operand checks, the build and cache of the extension and the torch
fallbacks belong to the same three products and are tested together.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import itertools
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from rigl.errors import warn
from rigl.sparse.index import SparseIndex

_SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_linear.cpp"
_CONDENSED_SOURCE = _SOURCE.parent / "condensed_linear.cpp"  # the same extension's second file
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"]
_LDFLAGS = ["-fopenmp"]
_ENV = "RIGL_SPARSE_KERNELS"
_ext: ModuleType | None = None
_tried = False

# The dtype each supported dtype is computed in.
_EXACT = (torch.float32, torch.float64)
_COMPUTE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


# -- building ------------------------------------------------------------------------------
def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((ln for ln in text.splitlines() if ln.startswith("flags")), "")


def _cache_key(sources: list[Path] | None = None) -> str:
    """Hash of everything the compiled module depends on: the source's content (not its
    path, so two identical installs share one build and two different ones never overwrite
    each other's), the compile flags, the CPU flags (-march=native code must not run on
    another CPU type), and the torch and Python versions it links against."""
    digest = hashlib.sha256()
    for part in (
        *(source.read_bytes() for source in (sources or _sources())),
        " ".join(_CFLAGS + _LDFLAGS).encode(),
        _cpu_flags().encode(),
        torch.__version__.encode(),
        sys.implementation.cache_tag.encode(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _sources() -> list[Path]:
    """The C++ files of the extension (``_SOURCE`` holds the module definition)."""
    return [_SOURCE, _CONDENSED_SOURCE]


def _build() -> ModuleType:
    """The compiled linear kernels (see :func:`build_source`)."""
    return build_source(_sources(), "rigl_sparse_linear")


def build_source(sources: Path | list[Path], stem: str) -> ModuleType:
    """The compiled module of ``sources`` (one file or several): loaded from the cache if this key was built
    before, else built (minutes) with a line on stderr saying so."""
    from torch.utils import cpp_extension

    sources = [sources] if isinstance(sources, Path) else list(sources)
    name = f"{stem}_{_cache_key(sources)}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    folder = Path(root) / name
    library = folder / f"{name}{cpp_extension.LIB_EXT}"
    # A finished build is imported as is: no ninja run, so nothing can trigger a rebuild.
    # While another process builds it, torch's lock file is there: load() waits for it.
    if library.is_file() and not (folder / "lock").exists():
        spec = importlib.util.spec_from_file_location(name, library)
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    print(
        "rigl.sparse: compiling the C++ sparse kernels; this happens once (for this source, "
        f"CPU and torch) and can take a few minutes; cache: {folder}",
        file=sys.stderr,
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(source) for source in sources],
        build_directory=str(folder),
        # copies: torch appends its own flags to these lists in place, which would change
        # the cache key of every later build in this process (a rebuild each time)
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
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


# -- operands ------------------------------------------------------------------------------
def check_operands(
    values: Tensor,
    index: SparseIndex,
    xt: Tensor,
    dyt: Tensor | None = None,
    bias: Tensor | None = None,
) -> None:
    """ValueError naming the operand unless every one fits the index ``(out, in)``: ``values``
    (nnz,) of a supported dtype, ``xt`` (in, B), ``dyt`` (out, B), ``bias`` (out,), all of
    one dtype and on one device. The products call it before any kernel runs (a few
    microseconds: plain attribute comparisons)."""
    n_out, n_in = index.shape
    dtype, device = values.dtype, values.device
    if dtype not in _COMPUTE_DTYPE:
        raise ValueError(
            f"values has dtype {dtype}; supported: float32, float64, bfloat16, float16"
        )
    if values.shape != index.col_idx.shape:
        raise ValueError(f"values has shape {tuple(values.shape)}, the index {index.nnz} entries")
    operands = (("xt", xt, n_in, "columns (in)"), ("dyt", dyt, n_out, "rows (out)"))
    for name, t, rows, what in operands:
        if t is None:
            continue
        if t.dim() not in (2, 3) or t.shape[-2] != rows:
            raise ValueError(
                f"{name} has {t.shape[-2] if t.dim() > 1 else 0} rows (shape "
                f"{tuple(t.shape)}), the weight has {rows} {what}"
            )
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"{name} has dtype {t.dtype} on device {t.device}, values {dtype} on {device}"
            )
    if dyt is not None and (dyt.dim() != xt.dim() or _batch(dyt) != _batch(xt)):
        raise ValueError(
            f"xt and dyt differ in batch size or panels ({tuple(xt.shape)} and {tuple(dyt.shape)})"
        )
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != dtype):
        raise ValueError(
            f"bias is {bias.dtype} of shape {tuple(bias.shape)}, expected {dtype} of ({n_out},)"
        )
    if (bias is not None and bias.device != device) or index.row_ptr.device != device:
        raise ValueError(f"bias or index on another device than values ({device})")


def _batch(t: Tensor) -> tuple[int, ...]:
    """The batch part of an activation's shape: ``(B,)``, or ``(n_panels, width)``."""
    return (t.shape[-1],) if t.dim() == 2 else (t.shape[0], t.shape[2])


def _computed(t: Tensor | None) -> Tensor | None:
    """``t`` contiguous, in its compute dtype (a no-op for contiguous float32/float64)."""
    if t is None or (t.dtype in _EXACT and t.is_contiguous()):
        return t
    return t.to(_COMPUTE_DTYPE[t.dtype]).contiguous()


# -- panels --------------------------------------------------------------------------------
# Batches of more than ONE_PANEL_UP_TO rows are cut into panels of PANEL_WIDTH rows (see
# to_panels), both chosen by measurement: the compiled forward of a 512 x 2048 layer at
# density 0.02 runs at about 23 multiply-adds per ns on batches of 128 to 1,024 rows, 5
# at 4,096 (one (in x B) activation: every gathered row on another page); the character
# GPT of benchmarks/bench_char_gpt_backends.py (4,096 rows) stepped about 4% faster on
# panels of 64 rows than of 128, and 10% faster than of 512 (2 threads, AVX2).
ONE_PANEL_UP_TO = 256
PANEL_WIDTH = 64


def panel_width(n: int) -> int:
    """The width of the panels of an ``n``-row batch: ``n`` itself (one panel, the plain
    transpose) up to :data:`ONE_PANEL_UP_TO` rows, else :data:`PANEL_WIDTH`."""
    return n if n <= ONE_PANEL_UP_TO else PANEL_WIDTH


def to_panels(a: Tensor, width: int | None = None, *, use: str | None = None) -> Tensor:
    """The feature-major form of a row-major activation ``a`` ``(N, F)``, as the products
    take it: ``(F, N)`` (one panel, the transpose) when the batch fits one panel or the
    compiled kernels are not in use, else ``(n_panels, F, width)``: panel ``p`` holds rows
    ``p * width`` to ``(p + 1) * width`` transposed, the last panel's missing rows zero
    (so that they add nothing to a weight gradient)."""
    n = a.shape[0]
    width = panel_width(n) if width is None else width
    ext = _pick(use, a.device)
    if width >= n or ext is None or a.dtype not in _COMPUTE_DTYPE:
        return transpose(a, use=use)
    return ext.to_panels(a.contiguous(), width)


def to_panels_and_sums(a: Tensor, width: int, *, use: str | None = None) -> tuple[Tensor, Tensor]:
    """``(to_panels(a, width), a.sum(0))``, in one pass over ``a`` where the compiled kernels
    take it (float32, float64): the output gradient's panels and the bias gradient."""
    ext = _pick(use, a.device)
    if ext is None or width >= a.shape[0] or a.dtype not in _EXACT:
        return to_panels(a, width, use=use), a.sum(0)
    panels, sums = ext.to_panels_and_sums(a.contiguous(), width)
    return panels, sums


def from_panels(at: Tensor, n: int, *, use: str | None = None) -> Tensor:
    """Row-major ``(n, F)`` from the panels of :func:`to_panels` (``(F, n)``: the transpose,
    a view)."""
    if at.dim() == 2:
        return at.t()
    ext = _pick(use, at.device)
    if ext is not None and at.dtype in _COMPUTE_DTYPE:
        return ext.from_panels(at.contiguous(), n)
    return at.transpose(1, 2).reshape(-1, at.shape[1])[:n]


def _flat(t: Tensor) -> Tensor:
    """Panels ``(n_panels, F, width)`` as one ``(F, n_panels * width)`` (the fallbacks)."""
    return t if t.dim() == 2 else t.transpose(0, 1).reshape(t.shape[1], -1)


def _like(t: Tensor, panels: Tensor) -> Tensor:
    """``t`` ``(R, n_panels * width)`` back in the panel layout of ``panels``."""
    if panels.dim() == 2:
        return t
    n_panels, _, width = panels.shape
    return t.reshape(t.shape[0], n_panels, width).transpose(0, 1).contiguous()


def forward(
    values: Tensor,
    index: SparseIndex,
    xt: Tensor,
    bias: Tensor | None,
    *,
    use: str | None = None,
    rows: int | None = None,
) -> Tensor:
    """``yt (out, B) = W @ xt + bias``, with ``xt`` of shape ``(in, B)`` (or panels:
    ``(n_panels, in, width)`` in, ``(n_panels, out, width)`` out). With ``rows`` (panels
    only: the batch size), ``y`` row-major ``(rows, out)`` instead, written by the compiled
    kernel directly (no transpose of the output afterwards)."""
    check_operands(values, index, xt, bias=bias)
    dtype = values.dtype
    values, xt, bias = _computed(values), _computed(xt), _computed(bias)
    ext = _pick(use, values.device)
    direct = ext is not None and rows is not None and xt.dim() == 3  # the kernel writes y
    if ext is not None:
        yt = ext.forward(values, index.row_ptr, index.col_idx, xt, bias, rows if direct else -1)
    else:
        with _no_autocast(values.device):
            yt = torch.mm(_csr(index.row_ptr, index.col_idx, values, index.shape), _flat(xt))
        if bias is not None:
            yt += bias[:, None]
        yt = _like(yt, xt)
    if rows is not None and not direct:
        yt = from_panels(yt, rows, use=use)
    return yt.to(dtype)


def backward(
    values: Tensor,
    index: SparseIndex,
    xt: Tensor,
    dyt: Tensor,
    want_dx: bool = True,
    want_dw: bool = True,
    *,
    use: str | None = None,
    rows: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dxt (in, B), dW values (nnz,))``; either is None when not wanted. Panels as
    :func:`forward` takes them give ``dxt`` in panels too, or with ``rows`` (the batch
    size) ``dx`` row-major ``(rows, in)``, written by the compiled kernel directly."""
    check_operands(values, index, xt, dyt)
    dtype = values.dtype
    values, xt, dyt = _computed(values), _computed(xt), _computed(dyt)
    ext = _pick(use, values.device)
    direct = ext is not None and rows is not None and xt.dim() == 3  # the kernel writes dx
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
            rows if direct else -1,
        )
    else:
        with _no_autocast(values.device):
            dxt, dw = _backward_torch(values, index, _flat(xt), _flat(dyt), want_dx, want_dw)
        dxt = None if dxt is None else _like(dxt, xt)
    if want_dx and rows is not None and not direct:
        dxt = from_panels(dxt, rows, use=use)
    return (dxt.to(dtype) if want_dx else None), (dw.to(dtype) if want_dw else None)


def _backward_torch(
    values: Tensor, index: SparseIndex, xt: Tensor, dyt: Tensor, want_dx: bool, want_dw: bool
) -> tuple[Tensor | None, Tensor | None]:
    dxt = dw = None
    n_in = index.shape[1]
    if want_dx:  # one CSR of W_b^T per row block b
        dxt = torch.zeros(n_in, dyt.shape[1], dtype=dyt.dtype, device=dyt.device)
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
    ext = _pick(use, a.device)
    if ext is not None and a.is_contiguous() and a.dtype in _COMPUTE_DTYPE:
        return ext.transpose(a)
    return at.contiguous()


def _csr(ptr: Tensor, idx: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": we know, and rely on it
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(ptr, idx, values, shape, check_invariants=False)


def _no_autocast(device: torch.device) -> torch.autocast | contextlib.nullcontext:
    """The fallback's products run in the dtype they are given (under autocast, ``torch.mm``
    would cast its operands down again)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def _pick(use: str | None, device: torch.device | None = None) -> ModuleType | None:
    """The compiled module for ``use`` (None: when available), or None for the fallback.
    The compiled kernels run on the CPU only: other devices take the fallback."""
    on_cpu = device is None or device.type == "cpu"
    if use is None:
        return extension() if on_cpu else None
    if use == "torch":
        return None
    if use == "cpp":
        ext = extension()
        if ext is None:
            raise RuntimeError("the compiled rigl.sparse kernels are not available")
        if not on_cpu:
            raise RuntimeError(f"the compiled rigl.sparse kernels run on the CPU, not {device}")
        return ext
    raise ValueError(f"use={use!r}; allowed: None, 'cpp', 'torch'")
