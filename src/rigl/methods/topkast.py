"""Top-KAST (Jayakumar et al., NeurIPS 2020, "Top-KAST: Top-K Always Sparse Training"):
forward with the top-K weights by magnitude, backward into a larger top-(K+M) set, and an
exploration penalty that lets the sets change."""

from __future__ import annotations

from typing import Any

import torch

from rigl.errors import ConfigError, check_real
from rigl.magnitude_reserve import MagnitudeReserve, penalize
from rigl.sparsifier import Sparsifier, register_method


@register_method("topkast")
class TopKAST(MagnitudeReserve, Sparsifier):
    """Each layer keeps a dense θ; the forward uses A, its top-K by ``|θ|`` (density D, from
    ``sparsity`` and the distribution), and the backward trains B, the top-(K+M) ⊇ A
    (``backward_sparsity``; default: B twice A, ``1 - 2 (1 - sparsity)``, at least dense).
    The gradient at B \\ A is taken with those weights at zero in the forward; weights
    outside B keep their values, frozen, and re-enter when B's shrink below them. The
    exploration penalty is an L2 term ``penalty / 2 θ²`` on A and ``penalty / (2 D) θ²`` on
    B \\ A (the paper's scaling by 1/D), default ``penalty`` 1e-4 (our choice). A and B are
    refreshed after every optimizer step (``update_interval=1``) through the whole run.

    Stored as :class:`rigl.reserve.ReservedWeight` s (masked backend only: the frozen
    values form a dense reserve). Training cost ``(2 + r) f_S``, ``r = |B| / |A|``: the
    forward and the input gradient at A, the weight gradient at B only (no dense gradient).
    """

    label = "Top-KAST"
    aliases = ("top-kast",)

    @classmethod
    def train_step_flops(
        cls,
        f_sparse: float,
        f_dense: float,
        *,
        update_interval: int,
        backward_ratio: float = 2.0,
        **facts: float,
    ) -> float:
        """``(2 + r) f_S`` with ``r = |B| / |A|`` (``backward_ratio``), at most ``3 f_D``."""
        del update_interval, facts
        return min((2 + backward_ratio) * f_sparse, 2 * f_sparse + f_dense)

    def __init__(
        self,
        *args: Any,
        backward_sparsity: float | None = None,
        penalty: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        self.penalty = check_real(penalty, "penalty", low=0.0)
        super().__init__(*args, **kwargs)
        forward = self.config.sparsity
        if backward_sparsity is None:
            backward_sparsity = max(0.0, 1 - 2 * (1 - forward))
        self.backward_sparsity = check_real(
            backward_sparsity, "backward_sparsity", low=0.0, high=1.0
        )
        if self.backward_sparsity > forward:
            raise ConfigError(
                f"backward_sparsity={backward_sparsity} is above sparsity={forward}: Top-KAST "
                "trains a superset of the forward weights; choose backward_sparsity <= sparsity"
            )

    def trained_count(self, index: int, n_active: int, numel: int) -> int:
        """``n_active (1 - backward_sparsity) / (1 - sparsity)``, within [n_active, numel]."""
        del index
        ratio = (1 - self.backward_sparsity) / max(1 - self.config.sparsity, 1e-12)
        return min(numel, max(n_active, round(n_active * ratio)))

    def train_flops_facts(self) -> dict[str, float]:
        n_active = sum(w.n_active for w in self.reserved())
        n_trained = sum(int(w.trained.count_nonzero()) for w in self.reserved())
        return {"backward_ratio": n_trained / max(n_active, 1)}

    def observe_gradients(self) -> None:
        if not self.penalty:
            return
        for weight in self.reserved():
            scale = torch.where(weight.mask, 1.0, 1.0 / max(weight.density, 1e-12))
            penalize(weight, weight.trained, self.penalty * scale)
