"""Compressed sparse training backend: kernels and ``SparseLinear`` (see design.md)."""

from rigl.sparse.condensed import CondensedLinear
from rigl.sparse.export import load_sparse, save_sparse
from rigl.sparse.function import SparseLinearFunction, sparse_linear
from rigl.sparse.index import SparseIndex
from rigl.sparse.kernels import backend
from rigl.sparse.linear import SparseLinear

__all__ = [
    "CondensedLinear",
    "SparseIndex",
    "SparseLinear",
    "SparseLinearFunction",
    "backend",
    "load_sparse",
    "save_sparse",
    "sparse_linear",
]
