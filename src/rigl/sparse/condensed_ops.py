"""Index and products of a condensed (constant fan-in) sparse weight.

Every output row keeps exactly ``k`` inputs, so the pattern is one int32 tensor
``col_idx`` of shape ``(out, k)``, columns sorted within a row (row-major flat-index order,
the order of the values). No row pointers: row ``o`` is ``values[o * k:(o + 1) * k]``.
N:M sparsity (``N`` active in every group of ``M`` consecutive inputs of a row) is this
layout with ``k = N * in / M`` and the per-group count checked when an index is built.

Products, activations feature-major as in :mod:`rigl.sparse.kernels` (``xt`` ``(in, B)``):

- :func:`forward`: ``yt = W @ xt + bias``, compiled: one contiguous range of rows per
  thread (every row is the same work), ``k`` gathered rows of ``xt`` per output row;
- :func:`backward`: ``dxt = W^T @ dyt`` needs the transposed pattern: a blocked CSC of the
  same positions (``index.csc``, rebuilt only when the topology changes) run through the
  fused CSC kernel of the unstructured layer, which also gives ``dW`` in the same pass
  (each gathered ``dyt`` row is loaded once and used for both products). When ``dx`` is
  not wanted (a first layer, grow scores), ``dW = (dyt @ xt^T)`` at the active entries
  runs row by row on the condensed index itself: no transposed index, the row's ``dyt``
  tile stays in registers, the result is written in values order.

The torch fallbacks gather ``xt`` rows by ``col_idx`` in blocks of rows (bounded memory)
and are tested equal to the compiled kernels and to the dense masked product.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from rigl.config import ConfigError
from rigl.sparse import kernels
from rigl.sparse.index import _INT32_MAX, SparseIndex

_GATHER_ELEMENTS = 1 << 22  # elements gathered per block by the torch fallbacks


@dataclass(frozen=True)
class CondensedIndex:
    """``col_idx`` ``(out, k)`` (int32, sorted within rows) and its derived blocked CSC."""

    shape: tuple[int, int]
    col_idx: Tensor  # (out, k)
    csc: SparseIndex  # the same positions; its col_idx is a flat view of ours
    group: int | None = None  # M of an N:M pattern (N = k * M / in), checked on build

    @property
    def k(self) -> int:
        return int(self.col_idx.shape[1])

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @staticmethod
    def from_cols(
        cols: Tensor,
        shape: tuple[int, int],
        group: int | None = None,
        *,
        where: str = "",
        use: str | None = None,
    ) -> CondensedIndex:
        """The index of ``cols`` ``(out, k)``, after :func:`check_cols` (a ConfigError naming
        ``where`` for a corrupt one); the CSC is built on the CPU and moved to ``cols``'s
        device."""
        check_cols(cols, shape, group, where=where)
        device = cols.device
        cols = cols.detach().to("cpu", torch.int32).contiguous()
        n_out = shape[0]
        rows = torch.arange(n_out).repeat_interleave(cols.shape[1])
        csc = SparseIndex.from_sorted_coo(rows, cols.reshape(-1), shape, use=use)
        index = CondensedIndex(shape, cols, csc, group)
        return index if device.type == "cpu" else index.to(device)

    @staticmethod
    def from_flat(
        flat: Tensor, shape: tuple[int, int], group: int | None = None, *, use: str | None = None
    ) -> CondensedIndex:
        """The index of row-major sorted flat positions ``row * in + col`` (the same count
        in every row, else a ValueError saying which row differs)."""
        n_out, n_in = shape
        flat = flat.reshape(-1).to(torch.int64)
        rows = torch.div(flat, max(n_in, 1), rounding_mode="floor")
        counts = torch.bincount(rows, minlength=n_out)
        k = int(counts[0]) if n_out else 0
        if bool((counts != k).any()):
            row = int((counts != k).nonzero()[0])
            raise ValueError(
                f"row {row} has {int(counts[row])} active inputs, row 0 has {k}: a condensed "
                "layer keeps the same number in every row"
            )
        if bool((rows != torch.arange(n_out, device=flat.device).repeat_interleave(k)).any()):
            raise ValueError("the positions are not sorted row-major")
        cols = (flat - rows * n_in).reshape(n_out, k)
        return CondensedIndex.from_cols(cols, shape, group, use=use)

    def flat(self) -> Tensor:
        """``row * in + col`` of every entry, values order (int64, nnz)."""
        rows = torch.arange(self.shape[0], device=self.col_idx.device)[:, None]
        return (rows * self.shape[1] + self.col_idx.to(torch.int64)).reshape(-1)

    def to(self, device: torch.device | str) -> CondensedIndex:
        cols = self.col_idx.to(device)
        moved = {name: t.to(device) for name, t in self.csc.tensors().items()}
        csc = SparseIndex(self.csc.shape, **{**moved, "col_idx": cols.view(-1)})  # shared
        return CondensedIndex(self.shape, cols, csc, self.group)

    def derived(self) -> dict[str, Tensor]:
        """The CSC tensors (not stored in checkpoints: rebuilt from ``col_idx``)."""
        return {f"csc_{k}": t for k, t in self.csc.tensors().items() if k != "col_idx"}


def check_cols(cols: Tensor, shape: tuple[int, int], group: int | None, *, where: str = "") -> None:
    """ConfigError naming ``{where}col_idx`` unless ``cols`` is a valid condensed pattern of
    ``shape``: integer ``(out, k)``, columns in ``[0, in)`` strictly increasing within each row,
    and with ``group`` = M, the same count in every group of M inputs. The kernels index
    memory with these columns, so a corrupt checkpoint must not reach them. O(nnz)."""
    n_out, n_in = shape

    def fail(problem: str) -> ConfigError:
        if not where:  # positions given to set_topology
            return ConfigError(f"the columns {problem} (weight of shape {shape})")
        return ConfigError(
            f"{where}'col_idx' {problem}: the checkpoint is corrupt or not of this layer "
            f"(weight of shape {shape})"
        )

    if cols.dtype not in (torch.int32, torch.int64):
        raise fail(f"has dtype {cols.dtype}; indices are int32")
    if cols.dim() != 2 or cols.shape[0] != n_out:
        raise fail(f"has shape {tuple(cols.shape)}; expected ({n_out}, k)")
    if cols.numel() > _INT32_MAX or max(shape) > _INT32_MAX:
        raise fail("is too large for int32 indices")
    if not cols.numel():
        return
    low, high = torch.aminmax(cols)
    if low < 0 or high >= n_in:
        raise fail(f"holds column {int(low) if low < 0 else int(high)}, outside [0, {n_in})")
    steps = cols[:, 1:] <= cols[:, :-1]
    if bool(steps.any()):
        row = int(steps.nonzero()[0, 0])
        raise fail(f"is not strictly increasing within row {row} (a duplicate or unsorted column)")
    if group is not None:
        per_group = cols.shape[1] * group // max(n_in, 1)
        counts = torch.zeros(n_out, max(n_in // group, 1), dtype=torch.int64, device=cols.device)
        counts.scatter_add_(
            1, cols.to(torch.int64) // group, torch.ones_like(cols, dtype=torch.int64)
        )
        bad = counts != per_group
        if cols.shape[1] * group != per_group * n_in or bool(bad.any()):
            row, g = (bad.nonzero()[0].tolist()) if bool(bad.any()) else (0, 0)
            raise fail(
                f"has {int(counts[row, g])} active inputs in group {g} of row {row}; an "
                f"{per_group}:{group} layer keeps {per_group} in every group of {group}"
            )


# -- products ------------------------------------------------------------------------------
def forward(
    values: Tensor,
    index: CondensedIndex,
    xt: Tensor,
    bias: Tensor | None,
    *,
    use: str | None = None,
    rows: int | None = None,
) -> Tensor:
    """``yt (out, B) = W @ xt + bias``, with ``xt`` of shape ``(in, B)`` or panels (see
    :func:`rigl.sparse.kernels.forward`, whose ``rows`` this takes too)."""
    yt = _forward(values, index, xt, bias, use)
    return yt if rows is None else kernels.from_panels(yt, rows, use=use)


def _forward(
    values: Tensor, index: CondensedIndex, xt: Tensor, bias: Tensor | None, use: str | None
) -> Tensor:
    kernels.check_operands(values, index.csc, xt, bias=bias)
    yt = _semi_structured(values, index, xt, bias) if use != "torch" else None
    if yt is not None:
        return yt
    dtype = values.dtype
    values, xt, bias = kernels._computed(values), kernels._computed(xt), kernels._computed(bias)
    ext = kernels._pick(use, values.device)
    n_out, k = index.col_idx.shape
    if ext is not None:
        grouped = index.group is not None
        yt = ext.condensed_forward(values.view(n_out, k), index.col_idx, xt, bias, grouped)
        return yt.to(dtype)
    panels, xt = xt, kernels._flat(xt)
    yt = torch.empty(n_out, xt.shape[1], dtype=xt.dtype, device=xt.device)
    w = values.view(n_out, k)
    with kernels._no_autocast(xt.device):
        for r0, r1 in _row_blocks(n_out, k * xt.shape[1]):  # y[o] = sum_j w[o, j] x[idx[o, j]]
            gathered = xt[index.col_idx[r0:r1].to(torch.int64)]  # (rows, k, B)
            yt[r0:r1] = torch.einsum("rk,rkb->rb", w[r0:r1], gathered)
    if bias is not None:
        yt += bias[:, None]
    return kernels._like(yt, panels).to(dtype)


def backward(
    values: Tensor,
    index: CondensedIndex,
    xt: Tensor,
    dyt: Tensor,
    want_dx: bool = True,
    want_dw: bool = True,
    *,
    use: str | None = None,
    rows: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(dxt (in, B), dW values (nnz,))``; either is None when not wanted (``rows``: see
    :func:`rigl.sparse.kernels.backward`)."""
    if want_dx:  # the fused CSC kernel (or its fallback) gives dW in the same pass
        return kernels.backward(values, index.csc, xt, dyt, want_dx, want_dw, use=use, rows=rows)
    kernels.check_operands(values, index.csc, xt, dyt)
    if not want_dw:
        return None, None
    return None, weight_grad(index, xt, dyt, use=use).reshape(-1).to(values.dtype)


def weight_grad(
    index: CondensedIndex, xt: Tensor, dyt: Tensor, *, use: str | None = None
) -> Tensor:
    """``dW (out, k)``: ``(dyt @ xt^T)`` at the active entries, in the compute dtype."""
    xt, dyt = kernels._computed(xt), kernels._computed(dyt)
    ext = kernels._pick(use, xt.device)
    if ext is not None:
        return ext.condensed_weight_grad(index.col_idx, xt, dyt)
    n_out, k = index.col_idx.shape
    xt, dyt = kernels._flat(xt), kernels._flat(dyt)
    dw = torch.empty(n_out, k, dtype=xt.dtype, device=xt.device)
    with kernels._no_autocast(xt.device):
        for r0, r1 in _row_blocks(n_out, k * xt.shape[1]):  # dw[o, j] = <dy[o], x[idx[o, j]]>
            gathered = xt[index.col_idx[r0:r1].to(torch.int64)]  # (rows, k, B)
            dw[r0:r1] = torch.einsum("rb,rkb->rk", dyt[r0:r1], gathered)
    return dw


def _semi_structured(
    values: Tensor, index: CondensedIndex, xt: Tensor, bias: Tensor | None
) -> Tensor | None:
    """``yt`` of a 2:4 layer on CUDA through PyTorch's semi-structured sparse tensor-core
    kernels (``torch.sparse.to_sparse_semi_structured``, float16/bfloat16, computed in the
    operands' dtype as ``nn.Linear`` on CUDA is), or None where they do not apply: another
    device, pattern or dtype, or a shape or GPU they refuse (the general products run
    then). The weight is compressed anew on every call, as it changes every step."""
    two_four = index.group == 4 and 2 * index.k == index.shape[1]
    if values.device.type != "cuda" or not two_four or xt.dim() != 2:
        return None
    if values.dtype not in (torch.float16, torch.bfloat16):
        return None
    from torch.sparse import to_sparse_semi_structured

    dense = torch.zeros(index.shape, dtype=values.dtype, device=values.device)
    dense.scatter_(1, index.col_idx.to(torch.int64), values.view(index.col_idx.shape))
    try:
        with warnings.catch_warnings():  # "prototype stage": we know, and fall back on errors
            warnings.simplefilter("ignore", UserWarning)
            yt = torch.mm(to_sparse_semi_structured(dense), xt)
    except (RuntimeError, ValueError, NotImplementedError):  # a shape or GPU it refuses
        return None
    return yt if bias is None else yt + bias[:, None]


def _row_blocks(n_out: int, per_row: int) -> list[tuple[int, int]]:
    step = max(1, _GATHER_ELEMENTS // max(per_row, 1))
    return [(r0, min(n_out, r0 + step)) for r0 in range(0, n_out, step)]
