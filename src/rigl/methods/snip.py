"""SNIP (Lee et al., 2019): one-shot pruning at step 0 by connection sensitivity |g·θ|."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rigl.sparsifier import Sparsifier, register_method
from rigl.storage import MaskedWeight


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
        self, index: int, weight: MaskedWeight, step: int, generator: torch.Generator
    ) -> Tensor | None:
        grad = weight.gradient()
        if grad is None:
            raise RuntimeError(f"SNIP needs the gradient of {weight.name} on its first step")
        score = (grad * weight.param.detach().flatten()).abs()
        return weight.prune(self.target_counts[index], score, generator)
