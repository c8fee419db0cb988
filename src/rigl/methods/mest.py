"""MEST (Yuan et al., NeurIPS 2021, "MEST: Accurate and Fast Memory-Economic Sparse
Training Framework on the Edge"): drop by ``|θ| + λ|∇θ|``, grow at random."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rigl.errors import check_real
from rigl.methods.set import SET
from rigl.seam import SparseStorage
from rigl.sparsifier import register_method


@register_method("mest")
class MEST(SET):
    """SET whose drop score is ``|θ| + λ |∇θ|`` per active weight (the gradient of the
    current batch, which every storage holds for its active weights; MEST's "elastic
    mutation"): a small weight that the loss still pulls on is kept. Growth is random
    (SET's scores), the update comes after the optimizer step as in SET.

    ``drop_lambda`` is λ (default 1.0: our choice, not taken from the paper); 0 is SET.
    Training cost ``3 f_S``: the score reads only the active weights' gradient, which the
    sparse backward computes anyway. Not built: the paper's "soft memory bound" (grow
    first, prune later, so a layer briefly holds more than its count).
    """

    supports_sparse_backend = True
    supports_sharding = False  # not tested under FSDP (its drop score reads the gradient)
    label = "MEST"  # training cost: the default 3 f_S

    def __init__(self, *args: Any, drop_lambda: float = 1.0, **kwargs: Any) -> None:
        self.drop_lambda = check_real(drop_lambda, "drop_lambda", low=0.0)
        super().__init__(*args, **kwargs)

    def drop_score(self, weight: SparseStorage) -> Tensor:
        score = weight.active_values().abs()
        if self.drop_lambda == 0:
            return score
        return score + self.drop_lambda * weight.active_gradient().abs().to(score.dtype)
