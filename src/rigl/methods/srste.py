"""SR-STE (Zhou et al., ICLR 2021, "Learning N:M Fine-grained Structured Sparse Neural
Networks From Scratch"): a dense θ, a forward with its top-N of every M by magnitude
recomputed every step, the straight-through gradient into all of θ plus a decay on the
pruned weights."""

from __future__ import annotations

from typing import Any

from rigl.errors import check_real
from rigl.magnitude_reserve import MagnitudeReserve, penalize
from rigl.sparsifier import Sparsifier, register_method


@register_method("srste")
class SRSTE(MagnitudeReserve, Sparsifier):
    """Sparse-refined straight-through estimator. The forward uses ``W̃ = S(θ)``, the
    largest ``|θ|`` of each layer under its pattern (N:M as in the paper, e.g.
    ``pattern="2:4"``; any pattern works, unstructured keeps the layer's top-K); the
    gradient of the loss w.r.t. ``W̃`` is applied to every weight of θ, plus the
    sparse-refined term ``λ_W (1 - mask) ⊙ θ`` (``lambda_w``, default 2e-4 as in the paper)
    that pulls the pruned weights toward zero so the mask settles. The masks are
    recomputed after every optimizer step (``update_interval=1``) through the whole run.

    Stored as :class:`rigl.reserve.ReservedWeight` s (θ outside the mask in a dense
    reserve; masked backend only). Training cost ``2 f_S + f_D``: a sparse forward and
    input gradient, and the dense weight gradient that θ needs.
    """

    label = "SR-STE"
    aliases = ("sr-ste",)

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: float
    ) -> float:
        """``2 f_S + f_D``: the weight gradient is dense (every weight of θ is trained)."""
        del update_interval, facts
        return 2 * f_sparse + f_dense

    def __init__(self, *args: Any, lambda_w: float = 2e-4, **kwargs: Any) -> None:
        self.lambda_w = check_real(lambda_w, "lambda_w", low=0.0)
        super().__init__(*args, **kwargs)

    def observe_gradients(self) -> None:
        if self.lambda_w:
            for weight in self.reserved():
                penalize(weight, ~weight.mask, self.lambda_w)
