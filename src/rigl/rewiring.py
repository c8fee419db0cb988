"""The plain data that a topology update passes between selection and storage.

:mod:`rigl.selection` reads a weight as a :class:`Grid` and its grow scores as
:data:`RowScores`, and returns a :class:`Rewiring`, which a storage installs
(:meth:`rigl.seam.SparseStorage.install`). No module, optimizer or storage here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.sharding import all_finite, is_sharded

# Grow scores of the rows [r0, r1) of a weight viewed as (rows, cols), flattened to
# ((r1 - r0) * cols,). A masked weight is read in one call; a compressed weight is read
# row block by row block, so a dense score matrix never has to exist. A RowScores must be
# a pure function of its rows: it may be called for any block, in any order, repeatedly,
# and its result is not written to (it may be a view of data the caller keeps).
RowScores = Callable[[int, int], Tensor]


@dataclass(frozen=True)
class Grid:
    """A weight as selection sees it: ``rows x cols`` flat positions, row-major.

    ``blocks`` equal contiguous row blocks each keep their own count (the q, k and v rows
    of a packed projection): drops and grows are split evenly over them. ``block_rows``:
    grow scores are read this many rows at a time (a compressed weight, whose dense
    gradient is one matrix product per block), or all at once when None (a masked weight,
    which holds the dense gradient). ``name`` names the weight in errors. ``pattern``: the
    structure every mask of this weight keeps (:mod:`rigl.patterns`).
    """

    rows: int
    cols: int
    blocks: int = 1
    block_rows: int | None = None
    name: str = "weight"
    pattern: Pattern = UNSTRUCTURED

    @property
    def numel(self) -> int:
        return self.rows * self.cols


class NonFiniteScore(Exception):
    """A score was inf/NaN: the whole topology update is skipped."""


class MissingGradient(RuntimeError):
    """A layer's gradient is needed on an update step and there is none: the layer took no
    part in this step's forward/backward (an unused head, an expert that got no tokens),
    or ``backward()`` was not called at all."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the gradient of {name} is needed on update steps; call loss.backward() before "
            "sparsifier.step()"
        )
        self.name = name


def check_finite(score: Tensor | None, name: str) -> None:
    """Raise :class:`NonFiniteScore` naming ``name`` if ``score`` holds an inf or NaN."""
    if score is None or score.numel() == 0:
        return
    if is_sharded(score):  # an FSDP2 gradient: each rank checks its shard, all agree
        if not all_finite(score.to_local(), score.device_mesh.get_group()):
            raise NonFiniteScore(f"non-finite scores in {name} (inf/NaN gradient?)")
        return
    if score.is_sparse:  # a sparse gradient (nn.Embedding(sparse=True)): its stored values
        score = score.coalesce().values()
    # One pass: NaN propagates to both ends, an inf is one of them (isfinite().all() is two
    # passes and a bool tensor, about 20x slower on a large score).
    low, high = torch.aminmax(score.detach().reshape(-1))
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise NonFiniteScore(f"non-finite scores in {name} (inf/NaN gradient?)")


@dataclass(frozen=True)
class Rewiring:
    """One layer's planned topology change.

    ``keep``: bool, one entry per active weight before the update, in flat order (True:
    stays). ``grown``: int64 flat positions that become active, none of them kept; a
    just-dropped position may be grown again (RigL's ``ArgTopK_{i ∉ θ \\ I_drop}``) and then
    stays active with its value and optimizer state, as if never dropped.
    ``grown_values``: starting values of ``grown`` (same order), or None for zeros; the
    optimizer state of a grown weight always starts fresh. A pure prune grows nothing.
    """

    keep: Tensor
    grown: Tensor
    grown_values: Tensor | None = None

    def __post_init__(self) -> None:
        if self.keep.dtype != torch.bool or self.keep.dim() != 1:
            raise ValueError(f"Rewiring.keep must be 1-D bool, got {self.keep.dtype}")
        if self.grown.dtype != torch.int64 or self.grown.dim() != 1:
            raise ValueError(f"Rewiring.grown must be 1-D int64, got {self.grown.dtype}")
        values = self.grown_values
        if values is not None and values.shape != self.grown.shape:
            raise ValueError(
                f"Rewiring.grown_values has shape {tuple(values.shape)}, "
                f"grown {tuple(self.grown.shape)}"
            )

    @property
    def n_kept(self) -> int:
        return int(self.keep.count_nonzero())

    def with_values(self, grown_values: Tensor | None) -> Rewiring:
        """The same plan with other starting values for the grown weights."""
        return dataclasses.replace(self, grown_values=grown_values)  # a subclass's fields kept
