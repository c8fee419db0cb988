"""SET (Mocanu et al., 2018): drop the smallest magnitudes, grow at random."""

from __future__ import annotations

import torch
from torch import Tensor

from rigl.grow_init import GrowInit
from rigl.rewiring import RowScores
from rigl.seam import SparseStorage
from rigl.sparsifier import Sparsifier, register_method

CHUNK_ROWS = 64  # random scores are drawn per chunk of rows, seeded by (update, chunk)


@register_method("set")
class SET(GrowInit, Sparsifier):
    """Sparse Evolutionary Training: the optimizer step is taken, then the mask changes.
    Grown weights start at zero unless ``grow_init`` says otherwise (see
    :mod:`rigl.grow_init`; the option of every subclass: RigL, SNFS, MEST)."""

    supports_sparse_backend = True
    supports_sharding = True
    label = "SET"  # training cost: 3 f_S (random growth is negligible)

    def grow_score(self, weight: SparseStorage, generator: torch.Generator) -> RowScores:
        # Scores are a pure function of (update seed, row), so a storage may read any row
        # block, in any order and more than once, and both backends see the same scores.
        base = int(torch.randint(0, 2**62, (1,), generator=generator))
        cols = weight.cols

        def scores(r0: int, r1: int) -> Tensor:
            parts = []
            for c0 in range(r0 - r0 % CHUNK_ROWS, r1, CHUNK_ROWS):
                n_rows = min(CHUNK_ROWS, weight.rows - c0)
                chunk = torch.rand(n_rows, cols, generator=torch.Generator().manual_seed(base + c0))
                parts.append(chunk[max(r0 - c0, 0) : min(r1 - c0, n_rows)])
            return torch.cat(parts).reshape(-1).to(weight.param.device)

        return scores
