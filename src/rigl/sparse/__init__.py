"""Compressed sparse training backend: kernels, ``SparseLinear``, ``SparseConv1d/2d`` and
``CondensedLinear`` (see design.md)."""

from rigl.sparse.condensed import CondensedLinear
from rigl.sparse.conv import SparseConv1d, SparseConv2d
from rigl.sparse.export import load_sparse, save_sparse
from rigl.sparse.function import SparseLinearFunction, sparse_linear
from rigl.sparse.index import SparseIndex
from rigl.sparse.kernels import backend
from rigl.sparse.linear import SparseLinear

__all__ = [
    "CondensedLinear",
    "SparseConv1d",
    "SparseConv2d",
    "SparseIndex",
    "SparseLinear",
    "SparseLinearFunction",
    "backend",
    "load_sparse",
    "save_sparse",
    "sparse_linear",
]
