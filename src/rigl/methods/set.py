"""SET (Mocanu et al., 2018): drop the smallest magnitudes, grow at random."""

from __future__ import annotations

import torch
from torch import Tensor

from rigl.sparsifier import Sparsifier, register_method
from rigl.storage import MaskedWeight


@register_method("set")
class SET(Sparsifier):
    """Sparse Evolutionary Training: the optimizer step is taken, then the mask changes."""

    def grow_score(self, weight: MaskedWeight, generator: torch.Generator) -> Tensor:
        return torch.rand(weight.numel, generator=generator).to(weight.param.device)
