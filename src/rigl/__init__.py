"""rigl: sparse training from scratch with RigL and the dynamic-sparse-training family.

Integration into an existing loop::

    sparsifier = rigl.create("rigl", model, optimizer, sparsity=0.9, total_steps=10_000)
    ...
    loss.backward()
    sparsifier.step()  # instead of optimizer.step()

The public names are imported on first use (PEP 562 ``__getattr__``): ``import rigl``
alone does not import torch, so the ``rigl`` command answers ``--help`` and ``--version``
at once and without the optional packages.
"""

from __future__ import annotations

import importlib
from typing import Any

from rigl._version import __version__ as __version__  # re-exported

_EXPORTS: dict[str, str] = {  # public name -> the module defining it
    "ConfigError": "rigl.config",
    "SparsityConfig": "rigl.config",
    "active_counts": "rigl.distributions",
    "layer_sparsities": "rigl.distributions",
    "FlopsReport": "rigl.flops",
    "count_flops": "rigl.flops",
    "big_sparse_width": "rigl.flops_size",
    "model_size": "rigl.flops_size",
    "small_dense_width": "rigl.flops_size",
    "width_for_params": "rigl.flops_size",
    "train_flops_ratio": "rigl.flops_train",
    "GMP": "rigl.methods",
    "SET": "rigl.methods",
    "SNFS": "rigl.methods",
    "SNIP": "rigl.methods",
    "Dense": "rigl.methods",
    "RigL": "rigl.methods",
    "Static": "rigl.methods",
    "PruningSchedule": "rigl.schedules",
    "UpdateSchedule": "rigl.schedules",
    "LayerSummary": "rigl.sparsifier",
    "Sparsifier": "rigl.sparsifier",
    "create": "rigl.registry",
    "get_method": "rigl.registry",
    "list_methods": "rigl.registry",
    "register_method": "rigl.registry",
    "MaskedWeight": "rigl.storage",
    "RewireStats": "rigl.seam",
    "Rewiring": "rigl.seam",
    "SparseStorage": "rigl.seam",
    "find_targets": "rigl.targets",
    "layer_densities": "rigl.targets",
    "drop_and_grow": "rigl.selection",
    "random_mask": "rigl.topology",
    "topk_mask": "rigl.topology",
    "InvariantError": "rigl.guard",
    "UsageError": "rigl.guard",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    """A public name (imported now and cached), or a submodule such as ``rigl.flops``."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name.startswith("__"):  # dunder probes (copy, pickle, IDEs): not submodules
        raise AttributeError(f"module 'rigl' has no attribute {name!r}")
    try:  # `import rigl; rigl.flops.count_flops(...)` worked when __init__ imported it all
        return importlib.import_module(f"rigl.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"rigl.{name}":
            raise
        raise AttributeError(f"module 'rigl' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
