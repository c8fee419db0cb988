"""Dense baseline: every weight active, no updates; ``step()`` is ``optimizer.step()``."""

from __future__ import annotations

from typing import Any

from rigl.sparsifier import Sparsifier, register_method


@register_method("dense")
class Dense(Sparsifier):
    """No-op baseline with the same interface (masks are all True, sparsity is 0)."""

    dense_start = True
    sparse = False
    supports_sharding = True  # all weights active: nothing to select
    label = "Dense"

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: float
    ) -> float:
        """``3 f_D``: forward and both backward products dense."""
        return 3 * f_dense

    def __init__(self, model: Any, optimizer: Any, **kwargs: Any) -> None:
        kwargs["sparsity"] = 0.0
        super().__init__(model, optimizer, **kwargs)

    def build_schedule(self, **args: Any) -> None:
        return None
