"""SNIP (Lee et al., 2019): one-shot pruning at step 0 by connection sensitivity |g·θ|."""

from __future__ import annotations

from typing import Any

import torch

from rigl import selection
from rigl.rewiring import Rewiring
from rigl.seam import SparseStorage
from rigl.sparsifier import Sparsifier, register_method


@register_method("snip")
class SNIP(Sparsifier):
    """Starts dense; on the first ``step()`` keeps, per layer, the ``n_l`` weights of largest
    ``|∂L/∂θ · θ|`` on the user's first batch (counts from the chosen distribution), then
    trains with that fixed mask. The first optimizer step already uses the pruned mask."""

    dense_start = True
    update_before_step = True
    label = "SNIP"  # training cost: 3 f_S (the one dense saliency step is negligible)

    def build_schedule(self, **args: Any) -> None:
        return None

    def should_update(self, step: int) -> bool:
        return self.update_count == 0

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        score = (weight.active_gradient() * weight.active_values()).abs()  # |∂L/∂θ · θ|
        return selection.prune(
            weight.active_positions(), score, self.target_counts[index], weight.grid, generator
        )
