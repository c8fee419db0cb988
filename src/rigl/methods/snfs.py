"""SNFS (Dettmers & Zettlemoyer, 2019): grow by the magnitude of the gradient momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rigl.errors import check_real
from rigl.methods.set import SET
from rigl.rewiring import RowScores
from rigl.sparsifier import register_method
from rigl.storage import MaskedWeight


@register_method("snfs")
class SNFS(SET):
    """Sparse momentum: every step keeps ``m = β m + (1 - β) g`` of the dense gradient;
    growth picks the largest ``|m|``. Costs a dense gradient every step (``2 f_S + f_D``)."""

    supports_sparse_backend = False  # the average is dense-shaped
    supports_sharding = False  # and of the whole weight
    label = "SNFS"

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: float
    ) -> float:
        """``2 f_S + f_D``: the dense gradient is needed every step for its momentum."""
        return 2 * f_sparse + f_dense

    def __init__(self, *args: Any, momentum: float = 0.9, **kwargs: Any) -> None:
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.ema: dict[str, Tensor] = {}
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def observe_gradients(self) -> None:
        for weight in self.weights:
            assert isinstance(weight, MaskedWeight)  # supports_sparse_backend is False
            grad = weight.dense_gradient()
            if grad is None or not bool(torch.isfinite(grad).all()):
                continue  # an inf/NaN gradient would poison the average for good
            ema = self.ema.get(weight.name)
            if ema is None:
                self.ema[weight.name] = (1.0 - self.momentum) * grad.clone()
            else:
                ema.mul_(self.momentum).add_(grad, alpha=1.0 - self.momentum)

    def grow_score(self, weight: MaskedWeight, generator: torch.Generator) -> RowScores:
        ema = self.ema.get(weight.name)
        if ema is None:
            ema = torch.zeros(weight.shape, device=weight.param.device)
        table = ema.reshape(weight.rows, weight.cols)
        return lambda r0, r1: table[r0:r1].abs().reshape(-1)

    def extra_state(self) -> dict[str, Any]:
        ema = {k: v.cpu().clone() for k, v in self.ema.items()}
        return {**super().extra_state(), "momentum": self.momentum, "ema": ema}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.ema = {
            w.name: state["ema"][w.name].to(w.param.device).clone()
            for w in self.weights
            if w.name in state.get("ema", {})
        }
