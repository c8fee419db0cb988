"""rigl: sparse training from scratch with RigL and the dynamic-sparse-training family.

Integration into an existing loop::

    sparsifier = rigl.create("rigl", model, optimizer, sparsity=0.9, total_steps=10_000)
    ...
    loss.backward()
    sparsifier.step()  # instead of optimizer.step()
"""

from rigl._version import __version__
from rigl.config import ConfigError, SparsityConfig
from rigl.distributions import active_counts, layer_sparsities
from rigl.flops import FlopsReport, count_flops
from rigl.flops_size import big_sparse_width, model_size, small_dense_width, width_for_params
from rigl.flops_train import train_flops_ratio
from rigl.guard import InvariantError, UsageError
from rigl.methods import GMP, SET, SNFS, SNIP, Dense, RigL, Static
from rigl.schedules import PruningSchedule, UpdateSchedule
from rigl.sparsifier import (
    LayerSummary,
    Sparsifier,
    create,
    get_method,
    list_methods,
    register_method,
)
from rigl.storage import MaskedWeight, RewireStats
from rigl.targets import find_targets, layer_densities
from rigl.topology import drop_and_grow, random_mask, topk_mask

__all__ = [
    "GMP",
    "SET",
    "SNFS",
    "SNIP",
    "ConfigError",
    "Dense",
    "FlopsReport",
    "InvariantError",
    "LayerSummary",
    "MaskedWeight",
    "PruningSchedule",
    "RewireStats",
    "RigL",
    "Sparsifier",
    "SparsityConfig",
    "Static",
    "UpdateSchedule",
    "UsageError",
    "__version__",
    "active_counts",
    "big_sparse_width",
    "count_flops",
    "create",
    "drop_and_grow",
    "find_targets",
    "get_method",
    "layer_densities",
    "layer_sparsities",
    "list_methods",
    "model_size",
    "random_mask",
    "register_method",
    "small_dense_width",
    "topk_mask",
    "train_flops_ratio",
    "width_for_params",
]
