"""RigL (Evci et al., 2020, "Rigging the Lottery: Making All Tickets Winners")."""

from __future__ import annotations

import torch

from rigl.methods.set import SET
from rigl.sparsifier import register_method
from rigl.storage import MaskedWeight, RowScores


@register_method("rigl")
class RigL(SET):
    """SET with growth by the dense gradient magnitude ``|∇θ L_t|`` of the current batch.

    As in the paper's Algorithm 1, an update step changes the topology instead of taking
    the optimizer step (``skip_optimizer_step_on_update=False`` takes both: the
    topology is updated first, then the step runs with the new mask).
    """

    update_before_step = True
    default_skip_optimizer_step = True
    supports_sparse_backend = True

    def grow_score(self, weight: MaskedWeight, generator: torch.Generator) -> RowScores:
        return lambda r0, r1: weight.gradient_rows(r0, r1).abs().reshape(-1)
