"""Starting values of grown connections: the official RigL code's ``grow_init`` option.

A mixin for the methods that grow connections (SET and its subclasses, GraNet): it adds the
constructor option ``grow_init`` and implements :meth:`rigl.Sparsifier.grown_values`.
Every value is drawn for one layer at one update, from that update's seeded generator, and
given to the grown positions in flat order, so it is the same on both backends, on every
data-parallel rank and after a resume:

- ``"zeros"`` (default): grown weights start at 0 (no values are drawn).
- ``"random_normal"``: ``N(0, σ²)``, σ the standard deviation of the layer's active
  weights just before the update.
- ``"random_uniform"``: ``U(-m, m)``, m the mean ``|θ|`` of the layer's active weights
  just before the update.
- ``"initial_dist"``: values drawn without replacement from the layer's active weights
  as they were when the sparsifier was created (its initial distribution).

As in the official code (``sparse_optimizers_base.get_grow_tensor``), a suffix ``_d`` (a
positive number, e.g. ``"random_normal_2"``) divides the values by ``d``. Differences from
it: σ and m are taken over the active weights (the official code reads the whole variable,
whose inactive entries are stale values), and ``initial_dist`` draws from the initial
*active* weights (the compressed backend never holds the dense initial tensor; with a
dense start they are the whole initial tensor, as there).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rigl.errors import ConfigError

if TYPE_CHECKING:
    from rigl.rewiring import Rewiring
    from rigl.seam import SparseStorage

GROW_INITS = ("zeros", "random_normal", "random_uniform", "initial_dist")
_SPEC = re.compile(
    r"^(zeros|random_normal|random_uniform|initial_dist)(?:_(\d+(?:\.\d*)?|\.\d+))?$"
)


def parse_grow_init(spec: object) -> tuple[str, float]:
    """``"random_normal_2"`` -> ``("random_normal", 2.0)``; a ConfigError naming the
    choices for anything else."""
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    divisor = float(match.group(2)) if match and match.group(2) else 1.0
    if match is None or not divisor > 0:
        raise ConfigError(
            f"grow_init={spec!r} is unknown; allowed: {', '.join(GROW_INITS)}, each optionally "
            "with a divisor suffix such as 'random_normal_2'"
        )
    return match.group(1), divisor


def draw_values(
    kind: str, k: int, current: Tensor, initial: Tensor | None, generator: torch.Generator
) -> Tensor:
    """``k`` starting values of ``kind`` (see the module docstring) on the CPU, float32:
    ``current`` are the layer's active values now, ``initial`` its initial active values."""
    current = current.detach().float().cpu()
    if kind == "random_normal":
        std = float(current.std(unbiased=False)) if current.numel() else 0.0
        return torch.randn(k, generator=generator) * std
    if kind == "random_uniform":
        mean = float(current.abs().mean()) if current.numel() else 0.0
        return (2 * torch.rand(k, generator=generator) - 1) * mean
    if kind == "initial_dist":
        assert initial is not None
        if initial.numel() == 0:
            return torch.zeros(k)
        if k <= initial.numel():  # without replacement, as the official shuffle
            return initial[torch.randperm(initial.numel(), generator=generator)[:k]]
        return initial[torch.randint(initial.numel(), (k,), generator=generator)]
    return torch.zeros(k)


class GrowInit:
    """Mixin: the ``grow_init`` option of the methods that grow connections (before the
    method's class in its bases, e.g. ``class SET(GrowInit, Sparsifier)``)."""

    weights: list[SparseStorage]

    def __init__(self, *args: Any, grow_init: str = "zeros", **kwargs: Any) -> None:
        self.grow_init, self.grow_init_divisor = parse_grow_init(grow_init)
        self.initial_values: dict[str, Tensor] = {}  # initial_dist: {weight: active values}
        super().__init__(*args, **kwargs)

    def _build(self) -> None:
        super()._build()  # type: ignore[misc]
        if self.grow_init == "initial_dist":
            self.initial_values = {
                w.name: w.active_values().detach().float().cpu().clone() for w in self.weights
            }

    def grown_values(
        self, index: int, weight: SparseStorage, plan: Rewiring, generator: torch.Generator
    ) -> Tensor | None:
        if self.grow_init == "zeros":
            return plan.grown_values
        current = weight.active_values()
        values = draw_values(
            self.grow_init,
            plan.grown.numel(),
            current,
            self.initial_values.get(weight.name),
            generator,
        )
        # the i-th draw goes to the i-th grown position in flat order: the same values at
        # the same positions whatever order a storage's selection lists them in
        ordered = torch.empty_like(values)
        ordered[torch.argsort(plan.grown.cpu())] = values
        return (ordered / self.grow_init_divisor).to(current.device, current.dtype)

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()  # type: ignore[misc]
        if self.initial_values:
            state["initial_values"] = {k: v.clone() for k, v in self.initial_values.items()}
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)  # type: ignore[misc]
        if "initial_values" in state:
            self.initial_values = {k: v.clone() for k, v in state["initial_values"].items()}
