"""A method defined outside the package, as a user would write it: the tests reach it
through ``RIGL_PLUGINS=plugin_methods`` (see tests/test_registry.py)."""

from __future__ import annotations

from typing import Any

import rigl


@rigl.register_method("random_grow_rigl")
class RandomGrowRigL(rigl.RigL):
    """RigL's timing (update before the step, that step skipped) with SET's random growth,
    so no dense gradient is needed: every step costs ``3 f_S``."""

    label = "RigL (random growth)"
    supports_sparse_backend = False
    grow_score = rigl.SET.grow_score

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: Any
    ) -> float:
        return 3 * f_sparse
