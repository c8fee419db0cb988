"""Index structures of a compressed sparse weight (rebuilt only when the topology changes).

A weight ``W`` of shape ``(out, in)`` with ``nnz`` active entries is held as

- CSR (row = output unit): ``row_ptr`` (out + 1), ``col_idx`` (nnz); the values tensor
  (nnz) lives in the layer, in this row-major order;
- CSC (the CSR of ``W^T``): ``col_ptr`` (in + 1), ``row_idx`` (nnz) and ``perm`` (nnz) with
  ``values_csc[k] = values[perm[k]]``; the backward pass walks ``W`` column by column.

Every index is int32: 12 bytes per non-zero for both orders (a torch CSR with int64
indices and a cached transpose costs 32 bytes per non-zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SparseIndex:
    """CSR and CSC indices of one ``(out, in)`` sparsity pattern (all int32)."""

    shape: tuple[int, int]
    row_ptr: Tensor  # (out + 1,)
    col_idx: Tensor  # (nnz,)
    col_ptr: Tensor  # (in + 1,)
    row_idx: Tensor  # (nnz,)
    perm: Tensor  # (nnz,) CSC position -> CSR position

    @property
    def nnz(self) -> int:
        return int(self.col_idx.numel())

    @staticmethod
    def from_flat(flat: Tensor, shape: tuple[int, int]) -> tuple[SparseIndex, Tensor]:
        """Index of the positions ``flat = row * in + col`` (any order, no duplicates).

        Returns the index and ``order``: ``flat[order]`` is row-major sorted, so values
        given in the order of ``flat`` are stored as ``values[order]``.
        """
        n_out, n_in = shape
        if max(n_out, n_in) > _INT32_MAX:
            raise ValueError(f"shape {shape} is too large for int32 indices")
        flat = flat.reshape(-1).to(torch.int64)
        flat_sorted, order = torch.sort(flat)
        if flat_sorted.numel() > 1 and bool((flat_sorted[1:] == flat_sorted[:-1]).any()):
            raise ValueError("indices contain duplicate positions")
        if flat_sorted.numel() and (flat_sorted[0] < 0 or flat_sorted[-1] >= n_out * n_in):
            raise ValueError(f"indices out of range for shape {shape}")
        rows = torch.div(flat_sorted, n_in, rounding_mode="floor")
        cols = flat_sorted - rows * n_in
        return SparseIndex.from_sorted_coo(rows, cols, shape), order

    @staticmethod
    def from_sorted_coo(rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> SparseIndex:
        """Index of row-major sorted, unique coordinates."""
        n_out, n_in = shape
        if rows.numel() > _INT32_MAX:
            raise ValueError("more than 2**31 - 1 non-zeros")
        row_ptr = _ptr(rows, n_out)
        # CSC order: sort by (col, row); the CSR positions are already row-major.
        csc_order = torch.argsort(cols * n_out + rows)
        return SparseIndex(
            shape=(n_out, n_in),
            row_ptr=row_ptr,
            col_idx=cols.to(torch.int32),
            col_ptr=_ptr(cols[csc_order], n_in),
            row_idx=rows[csc_order].to(torch.int32),
            perm=csc_order.to(torch.int32),
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
            "col_ptr": self.col_ptr,
            "row_idx": self.row_idx,
            "perm": self.perm,
        }


def _ptr(sorted_keys: Tensor, n: int) -> Tensor:
    """Compressed pointer (n + 1, int32) of sorted keys in [0, n)."""
    counts = torch.bincount(sorted_keys, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=ptr[1:])
    return ptr.to(torch.int32)
