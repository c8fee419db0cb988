"""Compressed sparse training backend: kernels and ``SparseLinear`` (see design.md)."""

from rigl.sparse.index import SparseIndex
from rigl.sparse.kernels import backend
from rigl.sparse.linear import SparseLinear, SparseLinearFunction, sparse_linear

__all__ = ["SparseIndex", "SparseLinear", "SparseLinearFunction", "backend", "sparse_linear"]
