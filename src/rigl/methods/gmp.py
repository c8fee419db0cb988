"""Gradual magnitude pruning (Zhu & Gupta, 2017): dense start, cubic ramp to the target."""

from __future__ import annotations

import math
from typing import Any

import torch

from rigl import selection
from rigl.config import resolve_step
from rigl.flops_train import (
    PRUNING_BEGIN,
    PRUNING_END,
    PRUNING_INTERVAL,
    pruning_flops_fraction,
    pruning_window_facts,
)
from rigl.rewiring import Rewiring
from rigl.schedules import PruningSchedule
from rigl.seam import SparseStorage
from rigl.sparsifier import Sparsifier, register_method


@register_method("gmp")
class GMP(Sparsifier):
    """Starts dense; every ΔT steps from ``begin_step`` to ``end_step`` keeps the largest
    magnitudes so that layer l has ``floor(s_l * p(t) * N_l)`` zeros, with ``s_l`` its final
    sparsity and ``p(t) = 1 - (1 - (t - t0)/(t1 - t0))^3``. ``begin_step`` defaults to 10%
    of ``end_step``. Pruned weights never return."""

    dense_start = True
    aliases = ("pruning",)
    label = "Pruning"

    @classmethod
    def train_step_flops(
        cls,
        f_sparse: float,
        f_dense: float,
        *,
        update_interval: int,
        pruning_begin: float = PRUNING_BEGIN,
        pruning_end: float = PRUNING_END,
        pruning_interval: float = PRUNING_INTERVAL,
        **facts: float,
    ) -> float:
        """``3 f(t)`` averaged over the cubic schedule (see
        :func:`rigl.flops_train.pruning_flops_fraction`; the facts are fractions of the
        run, by default the official ImageNet schedule); ``f_sparse`` is the cost at the
        final sparsity."""
        r = pruning_flops_fraction(pruning_begin, pruning_end, pruning_interval)
        return 3 * (f_dense - r * (f_dense - f_sparse))

    def train_flops_facts(self) -> dict[str, float]:
        """This run's pruning schedule as fractions of ``total_steps``."""
        return pruning_window_facts(self.schedule, self.total_steps)

    def build_schedule(self, **args: Any) -> PruningSchedule:
        end = resolve_step(args["end_step"], self.total_steps, "end_step")
        begin = args["begin_step"]
        if begin is None:
            begin = round(0.1 * end)
        return PruningSchedule(
            begin_step=begin, end_step=end, update_interval=args["update_interval"]
        )

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        n_prunable = weight.numel - self.target_counts[index]
        n_keep = weight.numel - math.floor(self.schedule.progress(step) * n_prunable)
        if n_keep >= weight.n_active:
            return None
        return selection.prune(
            weight.active_positions(), self.drop_score(weight), n_keep, weight.grid, generator
        )
