"""Index structures of a compressed sparse weight (rebuilt only when the topology changes).

A weight ``W`` of shape ``(out, in)`` with ``nnz`` active entries is held as

- CSR (row = output unit): ``row_ptr`` (out + 1), ``col_idx`` (nnz); the values tensor
  (nnz) lives in the layer, in this row-major order;
- blocked CSC: the rows are cut into ``n_blocks`` blocks of about ``block_nnz`` non-zeros
  (boundaries ``block_rows``, n_blocks + 1) and each block has its own CSC: ``col_ptr``
  (n_blocks * (in + 1), global positions), ``row_idx`` (nnz) and ``perm`` (nnz) with
  ``values_csc[k] = values[perm[k]]``. The backward pass walks one block at a time, column
  by column, so that what it gathers (output-gradient rows, values, dW) stays in cache.

Every index is int32: 12 bytes per non-zero for both orders (a torch CSR with int64
indices and a cached transpose costs 32 bytes per non-zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rigl.config import ConfigError

_INT32_MAX = 2**31 - 1
BLOCK_NNZ = 65536  # non-zeros per row block of the CSC (values + dW window ~ 512 KB)


@dataclass(frozen=True)
class SparseIndex:
    """CSR and CSC indices of one ``(out, in)`` sparsity pattern (all int32)."""

    shape: tuple[int, int]
    row_ptr: Tensor  # (out + 1,)
    col_idx: Tensor  # (nnz,)
    block_rows: Tensor  # (n_blocks + 1,) row boundaries of the CSC blocks
    col_ptr: Tensor  # (n_blocks * (in + 1),)
    row_idx: Tensor  # (nnz,)
    perm: Tensor  # (nnz,) blocked-CSC position -> CSR position

    @property
    def n_blocks(self) -> int:
        return int(self.block_rows.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @staticmethod
    def from_flat(
        flat: Tensor,
        shape: tuple[int, int],
        block_nnz: int = BLOCK_NNZ,
        *,
        presorted: bool = False,
        use: str | None = None,
        csc: bool = True,
    ) -> tuple[SparseIndex, Tensor | None]:
        """Index of the positions ``flat = row * in + col`` (any order, no duplicates).

        Returns the index and ``order``: ``flat[order]`` is row-major sorted, so values
        given in the order of ``flat`` are stored as ``values[order]`` (``order`` is None
        when ``presorted`` says ``flat`` is sorted already). ``use`` picks the CSC builder
        as in :mod:`rigl.sparse.kernels` (None: compiled when available). ``csc=False``
        builds the CSR only (the CSC tensors empty, one block): for layers whose kernels
        read no CSC (the convolutions).
        """
        n_out, n_in = shape
        if max(n_out, n_in) > _INT32_MAX:
            raise ValueError(f"shape {shape} is too large for int32 indices")
        flat = flat.reshape(-1).to(torch.int64)
        if flat.numel():
            low, high = torch.aminmax(flat)
            if low < 0 or high >= n_out * n_in:
                raise ValueError(f"indices out of range for shape {shape}")
        flat_sorted, order = (flat, None) if presorted else _sort(flat, n_out * n_in)
        if flat_sorted.numel() > 1 and bool((flat_sorted[1:] <= flat_sorted[:-1]).any()):
            raise ValueError(
                "indices contain duplicate positions"
                if order is not None
                else "presorted indices are not strictly increasing"
            )
        rows = torch.div(flat_sorted, n_in, rounding_mode="floor")
        cols = flat_sorted - rows * n_in
        return SparseIndex.from_sorted_coo(rows, cols, shape, block_nnz, use=use, csc=csc), order

    @staticmethod
    def from_sorted_coo(
        rows: Tensor,
        cols: Tensor,
        shape: tuple[int, int],
        block_nnz: int = BLOCK_NNZ,
        *,
        use: str | None = None,
        csc: bool = True,
    ) -> SparseIndex:
        """Index of row-major sorted, unique coordinates (``csc``: see :meth:`from_flat`)."""
        from rigl.sparse import kernels  # kernels imports this module

        n_out, n_in = shape
        nnz = rows.numel()
        if nnz > _INT32_MAX:
            raise ValueError("more than 2**31 - 1 non-zeros")
        row_ptr = _ptr(rows, n_out)
        if not csc:
            empty = torch.zeros(0, dtype=torch.int32)
            return SparseIndex(
                shape=(n_out, n_in),
                row_ptr=row_ptr,
                col_idx=cols.to(torch.int32),
                block_rows=torch.tensor([0, n_out], dtype=torch.int32),
                col_ptr=empty,
                row_idx=empty.clone(),
                perm=empty.clone(),
            )
        # Row blocks of about block_nnz non-zeros (a row is never split).
        n_blocks = max(1, -(-nnz // block_nnz))
        goals = torch.arange(1, n_blocks, dtype=torch.int64) * nnz // n_blocks
        cuts = torch.searchsorted(row_ptr.to(torch.int64), goals)
        bounds = torch.unique(torch.cat([torch.tensor([0, n_out]), cuts.clamp(0, n_out)]))
        if len(bounds) < 2:  # no rows at all: one empty block
            bounds = torch.tensor([0, n_out])
        col_idx = cols.to(torch.int32)
        block_rows = bounds.to(torch.int32)
        ext = kernels._pick(use)
        if ext is not None:
            col_ptr, row_idx, perm = ext.csc_index(row_ptr, col_idx, block_rows, n_in)
        else:
            col_ptr, row_idx, perm = _blocked_csc(rows, cols, bounds, n_out, n_in)
        return SparseIndex(
            shape=(n_out, n_in),
            row_ptr=row_ptr,
            col_idx=col_idx,
            block_rows=block_rows,
            col_ptr=col_ptr,
            row_idx=row_idx,
            perm=perm,
        )

    def rows(self) -> Tensor:
        """Row of every non-zero in CSR order (int64, nnz)."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.shape[0]), counts)

    def flat(self) -> Tensor:
        """``row * in + col`` of every non-zero in CSR order (int64, nnz)."""
        return self.rows() * self.shape[1] + self.col_idx.to(torch.int64)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "row_ptr": self.row_ptr,
            "col_idx": self.col_idx,
            "block_rows": self.block_rows,
            "col_ptr": self.col_ptr,
            "row_idx": self.row_idx,
            "perm": self.perm,
        }


def check_csr(
    row_ptr: Tensor,
    col_idx: Tensor,
    nnz: int,
    shape: tuple[int, int],
    *,
    where: str = "",
    prefix: str = "",
) -> Tensor:
    """The flat positions ``row * in + col`` (int64, sorted) of a CSR pattern read from a
    checkpoint, or a :class:`~rigl.ConfigError` naming the tensor (``{where}'{prefix}row_ptr'``)
    and what is wrong with it: the kernels index memory with these tensors, so a corrupt one
    would make them read or write out of bounds. Vectorised, O(nnz + out).

    Valid: int32/int64, 1-D; ``row_ptr`` (out + 1) non-decreasing from 0 to ``nnz``;
    ``col_idx`` (nnz) in ``[0, in)``, strictly increasing within each row.
    """
    n_out, n_in = shape

    def fail(part: str, problem: str) -> ConfigError:
        return ConfigError(
            f"{where}'{prefix}{part}' {problem}: the checkpoint is corrupt or not of this "
            f"layer (weight of shape {shape})"
        )

    for part, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
        if t.dtype not in (torch.int32, torch.int64):
            raise fail(part, f"has dtype {t.dtype}; indices are int32")
        if t.dim() != 1:
            raise fail(part, f"has shape {tuple(t.shape)}; it must be 1-D")
    if row_ptr.numel() != n_out + 1:
        raise fail("row_ptr", f"has {row_ptr.numel()} entries, expected {n_out + 1} (rows + 1)")
    if col_idx.numel() != nnz:
        raise fail("col_idx", f"has {col_idx.numel()} entries, the values {nnz}")
    if nnz > _INT32_MAX:
        raise fail("col_idx", "has more than 2**31 - 1 entries")
    row_ptr = row_ptr.to(torch.int64)
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        raise fail(
            "row_ptr", f"runs from {int(row_ptr[0])} to {int(row_ptr[-1])}, expected 0 to {nnz}"
        )
    counts = row_ptr[1:] - row_ptr[:-1]
    if bool((counts < 0).any()):
        row = int((counts < 0).nonzero()[0])
        raise fail("row_ptr", f"decreases after row {row}: it must be non-decreasing")
    cols = col_idx.to(torch.int64)
    if nnz:
        low, high = torch.aminmax(cols)
        if low < 0 or high >= n_in:
            bad = int(low) if low < 0 else int(high)
            raise fail("col_idx", f"holds column {bad}, outside [0, {n_in})")
    flat = torch.repeat_interleave(torch.arange(n_out), counts) * n_in + cols
    if nnz > 1 and bool((flat[1:] <= flat[:-1]).any()):
        at = int((flat[1:] <= flat[:-1]).nonzero()[0]) + 1
        raise fail(
            "col_idx",
            f"is not strictly increasing within row {int(flat[at]) // max(n_in, 1)} "
            f"(position {at}: a duplicate or unsorted column)",
        )
    return flat


def _blocked_csc(
    rows: Tensor, cols: Tensor, bounds: Tensor, n_out: int, n_in: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(col_ptr, row_idx, perm)`` of the row blocks ``bounds`` in stock torch: a stable
    sort of the (row-major) positions by (block, col) keeps the rows of a column in order."""
    n_blocks = bounds.numel() - 1
    block_of_row = torch.bucketize(torch.arange(n_out), bounds[1:-1], right=True)
    key = block_of_row[rows] * n_in + cols
    csc_order = _sort(key, n_blocks * n_in, stable=True)[1]
    counts = torch.bincount(key, minlength=n_blocks * n_in).reshape(n_blocks, n_in)
    col_ptr = torch.zeros(n_blocks, n_in + 1, dtype=torch.int64)
    col_ptr[:, 1:] = counts.reshape(-1).cumsum(0).reshape(n_blocks, n_in)
    col_ptr[1:, 0] = col_ptr[:-1, -1]
    return (
        col_ptr.reshape(-1).to(torch.int32),
        rows[csc_order].to(torch.int32),
        csc_order.to(torch.int32),
    )


def _sort(keys: Tensor, bound: int, stable: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.sort`` of int64 ``keys`` in [0, bound): on int32 copies when they fit, which
    sorts 2-3x faster (an update rebuilds the index of every changed layer)."""
    if bound <= _INT32_MAX:
        values, order = torch.sort(keys.to(torch.int32), stable=stable)
        return values.to(torch.int64), order
    return torch.sort(keys, stable=stable)


def _ptr(sorted_keys: Tensor, n: int) -> Tensor:
    """Compressed pointer (n + 1, int32) of sorted keys in [0, n)."""
    counts = torch.bincount(sorted_keys, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr.to(torch.int32)
