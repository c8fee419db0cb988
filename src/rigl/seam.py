"""The storage seam: what an algorithm may ask of a sparse weight, and what it hands back.

Two storages implement :class:`SparseStorage`: :class:`rigl.storage.MaskedWeight` (a dense
parameter times a bool mask) and :class:`rigl.sparse.storage.SparseWeight` (only the active
values exist). An update runs in three steps, the same on both:

1. the method reads scores through the seam: a drop score per active weight (from
   :meth:`~SparseStorage.active_values` / :meth:`~SparseStorage.active_gradient`) and grow
   scores by row block (:data:`RowScores`, e.g. from :meth:`~SparseStorage.gradient_rows`);
2. the pure functions of :mod:`rigl.selection` choose, and return a :class:`Rewiring`;
3. :meth:`SparseStorage.install` applies it (a mask on one storage, a merge of sorted index
   runs on the other).

Every per-weight tensor of the seam lists the active weights in *flat order* (ascending
row-major position), so a drop score computed on one storage means the same on the other,
and both choose identical masks for the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rigl.rewiring import Grid, NonFiniteScore, Rewiring, RowScores, check_finite
from rigl.topology import TieBreak

__all__ = [
    "Grid",
    "NonFiniteScore",
    "RewireStats",
    "Rewiring",
    "RowScores",
    "SparseStorage",
    "check_finite",
]


@dataclass(frozen=True)
class RewireStats:
    """What one topology update did to one layer."""

    name: str
    n_active: int
    n_dropped: int  # active before, inactive after
    n_grown: int  # inactive before, active after (equals n_dropped for DST methods)


@runtime_checkable
class SparseStorage(Protocol):
    """A sparse weight as the algorithms see it, whatever its storage.

    Shapes: the weight is viewed as ``(rows, cols)`` (``cols`` = the product of the other
    dimensions); a flat position is ``row * cols + col``.
    """

    name: str  # the full parameter name, e.g. "encoder.0.weight"
    blocks: int  # equal contiguous row blocks that each keep their count (packed q/k/v)

    @property
    def param(self) -> nn.Parameter:
        """The trained tensor: the dense weight (masked) or the active values (compressed)."""
        ...

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's dense shape."""
        ...

    @property
    def rows(self) -> int: ...

    @property
    def cols(self) -> int: ...

    @property
    def numel(self) -> int:
        """``rows * cols``: every position, active or not."""
        ...

    @property
    def n_active(self) -> int:
        """Active weights now (the bookkeeping; see :attr:`n_nonzero` for a measurement)."""
        ...

    @property
    def density(self) -> float:
        """``n_active / numel``."""
        ...

    @property
    def mask(self) -> Tensor:
        """Bool tensor of :attr:`shape`, True at the active weights (the compressed storage
        builds it on demand: ``numel`` bytes, for inspection)."""
        ...

    @property
    def grid(self) -> Grid:
        """How :mod:`rigl.selection` sees this weight: rows, cols, row blocks, and how many
        rows of grow scores to read at a time (None: all at once)."""
        ...

    @property
    def holds_dense_gradient(self) -> bool:
        """True when the whole dense gradient exists anyway (masked storage), so scanning
        every position for growth costs no extra products; False when each block of the
        dense gradient is a matrix product (compressed storage), where a method may prefer
        sampled candidates (:func:`rigl.selection.grow_sampled`)."""
        ...

    # -- scores --------------------------------------------------------------------------
    def active_positions(self) -> Tensor:
        """Sorted int64 flat positions of the active weights, ``(n_active,)``."""
        ...

    def active_values(self) -> Tensor:
        """The active weights' values in flat order, ``(n_active,)`` (a detached tensor)."""
        ...

    def active_gradient(self) -> Tensor:
        """The gradient of the active weights in flat order, ``(n_active,)``; raises a
        RuntimeError naming the weight when there is none (no backward yet)."""
        ...

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient, ``(r1 - r0, cols)``, inactive positions
        included (averaged over data-parallel ranks like DDP's ``.grad``)."""
        ...

    def gradient_at(self, flat: Tensor) -> Tensor:
        """The dense gradient at the int64 flat positions ``flat`` only, same order."""
        ...

    # -- every step ----------------------------------------------------------------------
    def apply_mask(
        self, optimizer: torch.optim.Optimizer | None = None, gradient: bool = True
    ) -> None:
        """Inactive weights (and, if ``gradient``, their gradient) to zero, drifting
        optimizer state back to its initial value there (a no-op when they do not exist)."""
        ...

    def mask_gradient(self) -> None:
        """Zero the gradient of the inactive weights."""
        ...

    def prepare_step(self, update_due: bool) -> None:
        """Called before each step's backward with whether that step updates the topology."""
        ...

    # -- topology ------------------------------------------------------------------------
    def rewire(
        self, n_update: int, drop_score: Tensor, grow: RowScores, tie_break: TieBreak
    ) -> Rewiring:
        """The plan of one drop-and-grow update: drop the ``n_update`` active weights of
        smallest ``drop_score`` (one per active weight, flat order), grow as many by
        ``grow``. One storage process: :func:`rigl.selection.rewire`; a sharded storage
        agrees on the same plan with its peers (:mod:`rigl.sharding`)."""
        ...

    def install(
        self,
        rewiring: Rewiring,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
    ) -> RewireStats:
        """Apply ``rewiring``: kept weights keep value, optimizer state and gradient;
        dropped ones leave (zero, fresh state); grown ones start at ``grown_values`` (or
        zero) with fresh state and, if ``grown_gradient``, their dense gradient, else zero."""
        ...

    # -- checkpoints ---------------------------------------------------------------------
    def topology_state(self) -> Tensor:
        """What a checkpoint stores (a bool mask, or sorted int64 flat positions)."""
        ...

    def check_topology(self, state: Tensor) -> Tensor:
        """A checkpoint's topology in this storage's form, or a ConfigError naming the weight."""
        ...

    def load_topology(self, state: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install a checkpoint's topology (any active count), the optimizer state along."""
        ...

    # -- inspection ----------------------------------------------------------------------
    @property
    def n_nonzero(self) -> int:
        """Non-zero entries as they are now (measured, not the bookkeeping)."""
        ...

    def violations(self, optimizer: torch.optim.Optimizer | None) -> list[str]:
        """What breaks this storage's invariants now (empty when none)."""
        ...
