"""The method half of :mod:`rigl.reserve`: the mixin that SR-STE and Top-KAST share.

Their layers are :class:`rigl.reserve.ReservedWeight` s whose forward set A is the top-K of
``|θ|`` under the layer's pattern and whose optimizer trains B ⊇ A; A and B are chosen by
:func:`rigl.reserve.magnitude_plan` at the start and every ΔT steps (1 by default) through
the whole run; a checkpoint carries the reserves.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rigl.config import resolve_step
from rigl.errors import ConfigError
from rigl.reserve import ReservedWeight, magnitude_plan
from rigl.rewiring import Rewiring
from rigl.schedules import UpdateSchedule
from rigl.topology import update_generator

if TYPE_CHECKING:
    from rigl.seam import SparseStorage
    from rigl.targets import Target


class MagnitudeReserve:
    """Mixin (before :class:`rigl.Sparsifier`) for methods whose forward set is the top-K of
    a dense θ by magnitude and whose optimizer trains a superset of it: the layers are
    :class:`ReservedWeight` s, A and B are chosen by :func:`magnitude_plan` at the start and
    every ΔT steps (``update_interval``, default 1) from ``begin_step`` (default 0) to
    ``end_step`` (default: the whole run), and a checkpoint carries the reserves.
    A method sets :meth:`trained_count` (default: every position) and adds its penalty
    in ``observe_gradients``."""

    update_before_step = False
    default_skip_optimizer_step = False
    supports_sparse_backend = False  # the reserve is dense
    supports_sharding = False

    def __init__(
        self,
        *args: Any,
        update_interval: int = 1,
        begin_step: int | float | None = 0,
        end_step: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.update(update_interval=update_interval, begin_step=begin_step)
        super().__init__(*args, end_step=end_step, **kwargs)  # type: ignore[call-arg]

    def trained_count(self, index: int, n_active: int, numel: int) -> int:
        """How many positions of layer ``index`` the optimizer trains (B); at least A's."""
        del index, n_active
        return numel

    def build_schedule(self, **args: Any) -> UpdateSchedule:
        if self._skip_option:  # type: ignore[attr-defined]
            raise ConfigError(
                f"{self.name} refreshes its masks after optimizer steps; "  # type: ignore[attr-defined]
                "skip_optimizer_step_on_update=True would skip them all: leave it unset"
            )
        end = args.pop("end_step")
        total = self.total_steps  # type: ignore[attr-defined]
        end = (
            sys.maxsize
            if end is None and total is None
            else resolve_step(1.0 if end is None else end, total, "end_step")
        )
        return UpdateSchedule(end_step=end, **args)

    def masked_weight(self, index: int, target: Target, mask: Tensor) -> SparseStorage:
        """A reserved weight whose sets are the magnitude ones from the start."""
        if getattr(target.module, "sparse", False) is True:  # nn.Embedding(sparse=True)
            raise ConfigError(
                f"{self.name} needs a dense gradient for {target.name}, which "  # type: ignore[attr-defined]
                "nn.Embedding(sparse=True) does not give: use sparse=False, or leave "
                "embeddings dense (sparse_embeddings=False, the default)"
            )
        patterns = self.patterns  # type: ignore[attr-defined]
        weight = ReservedWeight(target.name, target.param, mask, target.blocks, patterns[index])
        generator = update_generator(self.seed, -3, index)  # type: ignore[attr-defined]
        weight.install(self.plan_layer(index, weight, -3, generator), None)
        return weight

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        """A = the top ``n_active`` of ``abs(θ)``, B = the top :meth:`trained_count`."""
        del step
        assert isinstance(weight, ReservedWeight)
        n_trained = self.trained_count(index, weight.n_active, weight.numel)
        return magnitude_plan(weight, weight.n_active, n_trained, generator)

    def reserved(self) -> list[ReservedWeight]:
        return [w for w in self.weights if isinstance(w, ReservedWeight)]  # type: ignore[attr-defined]

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()  # type: ignore[misc]
        state["reserves"] = {w.name: w.reserve_state() for w in self.reserved()}
        return state

    def check_extra_state(self, state: dict[str, Any]) -> None:
        super().check_extra_state(state)  # type: ignore[misc]
        reserves = state.get("reserves")
        if reserves is None:
            raise ConfigError(
                f"the state dict has no reserves: {self.name} needs the dense values it "  # type: ignore[attr-defined]
                "keeps outside its masks; it was saved by another version or method"
            )
        missing = [w.name for w in self.reserved() if w.name not in reserves]
        if missing:
            raise ConfigError(
                f"the state dict has no reserve for {', '.join(missing)}: it belongs to "
                "a different model"
            )
        for weight in self.reserved():
            weight.check_reserve(reserves[weight.name])

    def load_extra_state(self, state: dict[str, Any]) -> None:
        # load_state_dict ran check_extra_state on this state before changing anything
        super().load_extra_state(state)  # type: ignore[misc]
        for weight in self.reserved():
            weight.load_reserve(state["reserves"][weight.name])


def penalize(weight: ReservedWeight, where: Tensor, scale: Tensor | float) -> None:
    """Add ``scale * θ`` to the gradient at ``where`` (the gradient of ``scale/2 θ²``;
    ``scale`` a number or a tensor shaped like the weight); nothing without a gradient."""
    grad = weight.param.grad
    if grad is None:
        return
    term = weight.values().mul_(scale)  # a new tensor: scaled and masked in place
    grad.add_(torch.where(where, term, term.new_zeros(()), out=term).to(grad.dtype))
