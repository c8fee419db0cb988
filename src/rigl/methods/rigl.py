"""RigL (Evci et al., 2020, "Rigging the Lottery: Making All Tickets Winners")."""

from __future__ import annotations

import math
from typing import Any

import torch

from rigl import selection
from rigl.errors import check_real
from rigl.methods.set import SET
from rigl.rewiring import Rewiring, RowScores
from rigl.seam import SparseStorage
from rigl.sparsifier import register_method


@register_method("rigl")
class RigL(SET):
    """SET with growth by the dense gradient magnitude ``|∇θ L_t|`` of the current batch.

    As in the paper's Algorithm 1, an update step changes the topology instead of taking
    the optimizer step (``skip_optimizer_step_on_update=False`` takes both: the
    topology is updated first, then the step runs with the new mask).

    ``grow_candidates`` (default None: exact RigL) is for layers too large to scan: on a
    layer whose storage does not hold the dense gradient (``backend="sparse"``) that
    grows ``k`` connections, the gradient is computed only at ``ceil(grow_candidates * k)``
    positions drawn uniformly among those not kept, and the ``k`` largest grow. Under a
    pattern the candidates are drawn within every row (fan-in), within the groups that
    lost weights (N:M) or as free tiles (blocks), and the pattern's counts hold
    (:func:`rigl.selection.rewire_sampled`). 1 is SET with zero-initialised growth; large
    values approach exact RigL; where the candidates would be more than half of the
    positions they are drawn from, the layer grows exactly
    (:func:`rigl.selection.samples_growth`). Exact growth computes the full ``out x in``
    gradient, one block of rows at a time: ``out * in * batch`` multiply-adds per layer
    and update. Masked layers hold the dense gradient anyway and always grow exactly.
    """

    update_before_step = True
    default_skip_optimizer_step = True
    supports_sparse_backend = True
    label = "RigL"

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: float
    ) -> float:
        """``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``: a dense gradient once every ΔT steps."""
        dt = update_interval
        return (3 * f_sparse * dt + 2 * f_sparse + f_dense) / (dt + 1)

    def __init__(self, *args: Any, grow_candidates: float | None = None, **kwargs: Any) -> None:
        if grow_candidates is not None:
            grow_candidates = check_real(
                grow_candidates, "grow_candidates", low=1.0, hint=" (or None: exact RigL)"
            )
        self.grow_candidates = grow_candidates
        super().__init__(*args, **kwargs)

    def grow_score(self, weight: SparseStorage, generator: torch.Generator) -> RowScores:
        return lambda r0, r1: weight.gradient_rows(r0, r1).abs().reshape(-1)

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        if self.grow_candidates is None or weight.holds_dense_gradient:
            return super().plan_layer(index, weight, step, generator)
        n_update = math.floor(self.schedule.fraction(step) * weight.n_active)
        n_candidates = math.ceil(self.grow_candidates * n_update)
        if not selection.samples_growth(weight.grid, weight.n_active, n_update, n_candidates):
            return super().plan_layer(index, weight, step, generator)  # little saving: exact
        return selection.rewire_sampled(
            weight.active_positions(),
            self.drop_score(weight),
            lambda flat: weight.gradient_at(flat).abs(),
            weight.grid,
            n_update,
            n_candidates,
            generator,
        )
