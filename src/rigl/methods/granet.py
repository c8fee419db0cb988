"""GraNet (Liu et al., NeurIPS 2021, "Sparse Training via Boosting Pruning Plasticity with
Neuroregeneration"): gradual magnitude pruning with gradient regrowth at every update."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from rigl import selection
from rigl.config import resolve_step
from rigl.errors import ConfigError, check_real
from rigl.flops_train import (
    PRUNING_BEGIN,
    PRUNING_END,
    PRUNING_INTERVAL,
    pruning_flops_fraction,
    pruning_window_facts,
)
from rigl.grow_init import GrowInit
from rigl.rewiring import Rewiring, RowScores
from rigl.schedules import PruningSchedule, UpdateSchedule
from rigl.seam import SparseStorage
from rigl.sparsifier import Sparsifier, register_method
from rigl.targets import Target, target_counts


@register_method("granet")
class GraNet(GrowInit, Sparsifier):
    """Every ΔT steps from ``begin_step`` to ``end_step`` (and once at ``end_step``), layer
    l is pruned by magnitude to ``N_l - floor(z0_l + p(t) (z_l - z0_l))`` active weights,
    ``p(t) = 1 - (1 - (t - t0)/(t1 - t0))^3`` the Zhu & Gupta cubic ramp, ``z_l`` its final
    zeros and ``z0_l`` its zeros at the start; then a fraction ``f(t)`` of the weights left
    is dropped (smallest ``|θ|``) and as many grow where the dense gradient of the current
    batch is largest (RigL's rule, the just-pruned positions included), with ``f(t)`` the
    drop fraction α under its decay (cosine by default) over ``end_step``.

    ``initial_sparsity`` (default 0: a dense start) starts from a random mask at that
    sparsity, spread over the layers by the same distribution (``z0_l``), below the target.
    As in RigL the update needs this batch's gradient: it comes before the optimizer step,
    which is then taken with the new mask (``skip_optimizer_step_on_update=True`` skips
    it). ``begin_step`` defaults to 10% of ``end_step``, as for GMP. Masked backend only:
    the dense start, and the dense gradient scanned at every update.
    """

    dense_start = True  # by default; initial_sparsity > 0 starts sparse
    update_before_step = True
    label = "GraNet"

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
        initial_sparsity_fraction: float = 0.0,
        **facts: float,
    ) -> float:
        """``(3 f̄ ΔT + 2 f̄ + f_D) / (ΔT + 1)``: RigL's formula (one dense gradient every
        ΔT steps, for the regrowth) with the forward cost ``f̄ = f_D - r (f_D - f_S)``
        averaged over the pruning schedule, ``r = r0 + (1 - r0) mean(p(t))`` the mean
        fraction of the final sparsity reached (see
        :func:`rigl.flops_train.pruning_flops_fraction`), ``r0`` = ``initial_sparsity /
        sparsity`` (0 from dense; a cost linear in each layer's density, exact for the
        uniform distribution, close for ERK)."""
        r0 = initial_sparsity_fraction
        r = r0 + (1 - r0) * pruning_flops_fraction(pruning_begin, pruning_end, pruning_interval)
        f_mean = f_dense - r * (f_dense - f_sparse)
        dt = update_interval
        return (3 * f_mean * dt + 2 * f_mean + f_dense) / (dt + 1)

    def __init__(self, *args: Any, initial_sparsity: float = 0.0, **kwargs: Any) -> None:
        self.initial_sparsity = check_real(
            initial_sparsity, "initial_sparsity", low=0.0, high=1.0, high_open=True
        )
        self._initial_counts: list[int] | None = None
        super().__init__(*args, **kwargs)

    def train_flops_facts(self) -> dict[str, float]:
        """This run's pruning window as fractions of ``total_steps``, and ``r0``."""
        facts = pruning_window_facts(self.schedule, self.total_steps)
        if not facts:
            return {}
        sparsity = self.config.sparsity
        r0 = min(1.0, self.initial_sparsity / sparsity) if sparsity > 0 else 0.0
        return {**facts, "initial_sparsity_fraction": r0}

    def build_schedule(self, **args: Any) -> PruningSchedule:
        end = resolve_step(args["end_step"], self.total_steps, "end_step")
        begin = args["begin_step"]
        if begin is None:
            begin = round(0.1 * end)
        if self.initial_sparsity > self.config.sparsity:
            raise self._bad_initial_sparsity()
        # the regrowth fraction f(t): the drop fraction under its decay, as in RigL
        self.regrowth = UpdateSchedule(
            update_interval=args["update_interval"],
            end_step=end,
            begin_step=begin,
            drop_fraction=args["drop_fraction"],
            decay=args["decay"],
        )
        return PruningSchedule(
            begin_step=begin, end_step=end, update_interval=args["update_interval"]
        )

    def _bad_initial_sparsity(self) -> ConfigError:
        return ConfigError(
            f"initial_sparsity={self.initial_sparsity} is above sparsity="
            f"{self.config.sparsity}: GraNet prunes from the initial sparsity to the target; "
            "choose initial_sparsity <= sparsity"
        )

    def initial_counts(self) -> list[int]:
        """Active weights per layer at the start: all (dense start) or the counts of the
        same distribution at ``initial_sparsity``, never below the final counts."""
        if self._initial_counts is None:
            numels = [math.prod(t.shape) for t in self.targets]
            counts = numels
            if self.initial_sparsity > 0:
                config = dataclasses.replace(self.config, sparsity=self.initial_sparsity)
                counts = target_counts(self.targets, config)
            final = self.target_counts
            self._initial_counts = [max(c, n) for c, n in zip(counts, final, strict=True)]
        return self._initial_counts

    def initial_mask(self, index: int, target: Target, n_active: int) -> Tensor:
        """All weights (dense start), else :meth:`initial_counts` at random."""
        count = self.initial_counts()[index]
        if count == math.prod(target.shape):
            return torch.ones(target.shape, dtype=torch.bool)
        mask = torch.zeros(math.prod(target.shape), dtype=torch.bool)
        mask[self.initial_indices(index, target, count)] = True
        return mask.reshape(target.shape)

    def grow_score(self, weight: SparseStorage, generator: torch.Generator) -> RowScores:
        return lambda r0, r1: weight.gradient_rows(r0, r1).abs().reshape(-1)

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        """Prune to the schedule's count, then drop and regrow ``f(t)`` of the rest."""
        start = self.initial_counts()[index]
        zeros0, zeros1 = weight.numel - start, weight.numel - self.target_counts[index]
        n_keep = weight.numel - math.floor(
            zeros0 + self.schedule.progress(step) * (zeros1 - zeros0)
        )
        n_keep = min(n_keep, weight.n_active)
        active, score = weight.active_positions(), self.drop_score(weight)
        pruned = selection.prune(active, score, n_keep, weight.grid, generator)
        n_update = math.floor(self.regrowth.fraction(step) * n_keep)
        if n_update == 0:
            return pruned if n_keep < weight.n_active else None
        grow = self.grow_score(weight, generator)
        rewired = selection.rewire(
            active[pruned.keep], score[pruned.keep], grow, weight.grid, n_update, generator
        )
        keep = pruned.keep.clone()
        keep[pruned.keep] = rewired.keep  # kept by the prune and by the drop
        return Rewiring(keep, rewired.grown)
