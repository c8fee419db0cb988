"""A masked storage that trains more than its forward set, for the methods that keep a
dense θ and choose their masks from it by magnitude (SR-STE, Top-KAST).

A :class:`ReservedWeight` splits a dense θ in two: the parameter holds θ on the forward
set A (its mask; zero elsewhere, so the model's forward pass is the sparse one) and a
*reserve* tensor holds θ outside A. The optimizer trains a set B ⊇ A (``trained``: every
position for SR-STE, the top-(K+M) by magnitude for Top-KAST). Around each optimizer step:

- before it (:meth:`ReservedWeight.mask_gradient`, called by ``pre_optimizer_step``) the
  gradient is zeroed outside B and B \\ A's values come back from the reserve into the
  parameter, so the user's own optimizer steps all of B, with the gradient taken with B \\ A
  at zero in the forward (SR-STE's straight-through gradient, Top-KAST's backward);
- after it (:meth:`ReservedWeight.apply_mask`) B \\ A's new values go back to the reserve.

Between steps every invariant of a masked weight holds (inactive weights zero, exact
counts, a sparse forward), except that the optimizer state is fresh outside B rather than
outside A. A topology update (a :class:`ReservedRewiring`) re-splits θ: weights entering A
bring their θ, weights leaving it take theirs to the reserve, and the optimizer state
(shaped like the dense parameter) stays where it is, reset only where a position enters
or leaves B. Positions outside B keep their θ frozen in the reserve. Cost: one more dense
tensor per layer; masked backend only.

:mod:`rigl.magnitude_reserve` is the method half: the mixin that SR-STE and Top-KAST
share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rigl import selection
from rigl.errors import ConfigError
from rigl.optim_state import reset_optimizer_state
from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.rewiring import Rewiring
from rigl.seam import RewireStats
from rigl.storage import MaskedWeight
from rigl.topology import TieBreak, bottomk_keep


@dataclass(frozen=True)
class ReservedRewiring(Rewiring):
    """A :class:`Rewiring` that also sets the trained set B: ``trained``, sorted int64 flat
    positions containing every active one after the update (None: every position)."""

    trained: Tensor | None = None


class ReservedWeight(MaskedWeight):
    """A :class:`rigl.storage.MaskedWeight` whose values outside the mask are kept (the
    reserve) and whose optimizer trains ``trained`` ⊇ ``mask`` (see the module docstring).
    Built from the dense parameter: θ outside ``mask`` moves to the reserve at once."""

    _untrained_label = "untrained"

    def __init__(
        self,
        name: str,
        param: nn.Parameter,
        mask: Tensor,
        blocks: int = 1,
        pattern: Pattern = UNSTRUCTURED,
    ) -> None:
        super().__init__(name, param, mask, blocks, pattern)
        self.trained = torch.ones_like(self.mask)
        self._open = False  # True between mask_gradient() and the park after the step
        with torch.no_grad():
            self.reserve = torch.where(self.mask, 0.0, param.detach())
            param.masked_fill_(self._inactive, 0.0)

    @property
    def trained(self) -> Tensor:
        """Bool tensor shaped like the weight: the positions the optimizer steps (B)."""
        return self._trained

    @trained.setter
    def trained(self, trained: Tensor) -> None:
        self._trained = trained
        self._untrained_cache = ~trained
        self._all_trained = not bool(self._untrained_cache.any())  # SR-STE: B is everything
        self._parked_cache: Tensor | None = None

    @property
    def _untrained(self) -> Tensor:
        return self._untrained_cache

    def values(self) -> Tensor:
        """The dense θ: the active weights and the reserve (a new tensor)."""
        if self._open:  # between mask_gradient() and the park: B's values are in param
            return torch.where(self._trained, self.param.detach(), self.reserve)
        return self.param.detach() + self.reserve  # disjoint supports

    # -- around the optimizer step -------------------------------------------------------
    @torch.no_grad()
    def mask_gradient(self) -> None:
        """Before the optimizer step: the gradient outside B to zero, and B \\ A's values
        back into the parameter so that the step trains them."""
        if not self._all_trained:
            self._zero_gradient(self._untrained)
        if not self._open:
            param = self.param.detach()
            torch.where(self._parked(), self.reserve, param, out=param)
            self._open = True

    @torch.no_grad()
    def apply_mask(
        self, optimizer: torch.optim.Optimizer | None = None, gradient: bool = True
    ) -> None:
        """After the step: B \\ A's values back to the reserve, the parameter (and, if
        ``gradient``, its gradient) zero outside A; drifting optimizer state fresh outside B."""
        self._park()
        super().apply_mask(optimizer, gradient)

    def _park(self) -> None:
        if self._open:
            torch.where(self._parked(), self.param.detach(), self.reserve, out=self.reserve)
            self.param.masked_fill_(self._inactive, 0.0)
            self._open = False

    def _parked(self) -> Tensor:
        """B \\ A: the positions whose values go to the reserve between steps (computed once
        per mask and trained set)."""
        if self._parked_cache is None or self._parked_for is not self._mask:
            self._parked_cache = (
                self._inactive if self._all_trained else self._inactive & self._trained
            )
            self._parked_for = self._mask
        return self._parked_cache

    # -- topology ------------------------------------------------------------------------
    @torch.no_grad()
    def install(
        self,
        rewiring: Rewiring,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
    ) -> RewireStats:
        """Re-split θ by ``rewiring``: grown weights bring their θ from the reserve (or take
        ``grown_values``), dropped ones move theirs there; optimizer state is reset only
        where a position enters or leaves the trained set (``rewiring.trained`` if it is a
        :class:`ReservedRewiring`, else B grows by the new active weights). Only the
        positions that change are touched (SR-STE and Top-KAST install after every step)."""
        self._park()
        new_mask = self._mask_after(rewiring)
        if isinstance(rewiring, ReservedRewiring) and rewiring.trained is not None:
            new_trained = torch.zeros(self.numel, dtype=torch.bool, device=new_mask.device)
            new_trained[rewiring.trained] = True
            new_trained = new_trained.reshape(self.shape)
            if bool((new_mask & ~new_trained).any()):
                raise ValueError(f"{self.name}: the trained set must contain the active one")
            changed = new_trained ^ self._trained
        else:  # B grows by the active weights it lacks (none, for SR-STE's B of everything)
            changed = new_mask & self._untrained
            new_trained = self._trained | new_mask if bool(changed.any()) else self._trained
        if new_trained is not self._trained:
            reset_optimizer_state(optimizer, self.param, changed)
            self.trained = new_trained
        dropped = self.active_positions()[~rewiring.keep]
        grown = rewiring.grown
        regrown = self.mask.reshape(-1)[grown]  # dropped and grown again: stays active
        self._move(dropped, grown, rewiring.grown_values, new_mask)
        self.mask = new_mask
        new = grown[~regrown]
        if not grown_gradient and self.param.grad is not None:
            self._zero_gradient_at(new)
        n_regrown = int(regrown.count_nonzero())
        return RewireStats(
            self.name, self.n_active, dropped.numel() - n_regrown, grown.numel() - n_regrown
        )

    def _move(
        self, dropped: Tensor, grown: Tensor, grown_values: Tensor | None, new_mask: Tensor
    ) -> None:
        """Dropped positions' values to the reserve, then grown positions' values (their θ,
        or ``grown_values``) into the parameter; both tensors stay zero where the other holds
        the value. A position dropped and grown again keeps its value."""
        param = self.param.detach()
        if not param.is_contiguous():  # a flat view would be a copy: re-split the whole θ
            theta = (param + self.reserve).reshape(-1)
            if grown_values is not None:
                theta[grown] = grown_values.to(theta.dtype)
            theta = theta.reshape(self.shape)
            param.copy_(torch.where(new_mask, theta, 0.0))
            self.reserve = torch.where(new_mask, 0.0, theta)
            return
        flat, reserve = param.view(-1), self.reserve.view(-1)
        reserve[dropped] = flat[dropped]
        flat[dropped] = 0.0
        values = reserve[grown] if grown_values is None else grown_values.to(flat.dtype)
        flat[grown] = values
        reserve[grown] = 0.0

    def _zero_gradient_at(self, positions: Tensor) -> None:
        grad = self.param.grad
        if grad is None or not positions.numel():
            return
        if grad.is_sparse or not grad.is_contiguous():
            where = torch.zeros(self.numel, dtype=torch.bool, device=positions.device)
            where[positions] = True
            self._zero_gradient(where.reshape(self.shape))
        else:
            grad.view(-1)[positions] = 0.0

    def load_topology(self, mask: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """A checkpoint's mask; the reserve and trained set come with the method's state
        (:meth:`load_reserve`)."""
        self._park()
        super().load_topology(mask, optimizer)
        self.reserve.masked_fill_(self.mask, 0.0)
        self.trained = self._trained | self.mask

    def reserve_state(self) -> dict[str, Tensor]:
        return {"reserve": self.reserve.detach().cpu().clone(), "trained": self.trained.cpu()}

    def check_reserve(self, state: Any) -> None:
        """ConfigError naming this layer unless ``state`` is a reserve this weight can load:
        ``reserve`` and ``trained`` tensors of the weight's shape."""
        tensors = [
            state.get(key) if isinstance(state, dict) else None for key in ("reserve", "trained")
        ]
        if not all(isinstance(t, Tensor) for t in tensors):
            raise ConfigError(
                f"the saved reserve of {self.name} is not a dict of 'reserve' and 'trained' "
                "tensors: the state is corrupt or was saved by another version"
            )
        for t in tensors:
            if tuple(t.shape) != self.shape:
                raise ConfigError(
                    f"the saved reserve of {self.name} has shape {tuple(t.shape)}, the "
                    f"weight {self.shape}: the state belongs to a different model"
                )

    def load_reserve(self, state: dict[str, Tensor]) -> None:
        """Load a reserve :meth:`check_reserve` accepted."""
        reserve, trained = state["reserve"], state["trained"]
        device = self.param.device
        self.reserve = torch.where(self.mask, 0.0, reserve.to(device, self.param.dtype))
        self.trained = trained.to(device=device, dtype=torch.bool) | self.mask

    @torch.no_grad()
    def violations(self, optimizer: torch.optim.Optimizer | None) -> list[str]:
        found = super().violations(optimizer)
        if self._open:
            found.append("an optimizer step was opened (mask_gradient) and never closed")
        inside = int(self.reserve[self.mask].count_nonzero())
        if inside:
            found.append(f"its reserve holds {inside} values at active positions")
        if bool((self.mask & ~self._trained).any()):
            found.append("some active weights are outside its trained set")
        return found


def magnitude_plan(
    weight: ReservedWeight, n_forward: int, n_trained: int, tie_break: TieBreak
) -> ReservedRewiring:
    """The plan that makes A the top ``n_forward`` of ``|θ|`` under the weight's pattern
    (per row block and group, as :func:`rigl.selection.prune`) and B that plus the next
    ``n_trained - n_forward`` largest (unstructured; all positions when ``n_trained`` is
    the layer's size)."""
    grid, device = weight.grid, weight.param.device
    score = weight.values().abs_().reshape(-1)  # values() is a new tensor
    mask_path = _MASK_PATH and grid.blocks == 1
    if mask_path and grid.pattern.kind == "unstructured":
        in_new = _top_mask(score, n_forward, tie_break)
    else:
        every = torch.arange(weight.numel, device=device)
        chosen = every[selection.prune(every, score, n_forward, grid, tie_break).keep]
        in_new = torch.zeros(weight.numel, dtype=torch.bool, device=device)
        in_new[chosen] = True
    was = weight.mask.reshape(-1)
    trained = None
    if n_trained < weight.numel:  # B \\ A: the next largest outside A, unstructured
        n_extra = n_trained - int(in_new.count_nonzero())
        if mask_path:
            extra = _top_mask(score.masked_fill(in_new, -torch.inf), n_extra, tie_break)
            trained = (in_new | extra).nonzero().squeeze(1)
        else:
            rest = (~in_new).nonzero().squeeze(1)
            unstructured = dataclasses.replace(grid, pattern=UNSTRUCTURED)  # no pattern in B
            keep = selection.prune(rest, score[rest], n_extra, unstructured, tie_break).keep
            trained = torch.cat([in_new.nonzero().squeeze(1), rest[keep]]).sort().values
    grown = (in_new & ~was).nonzero().squeeze(1)
    return ReservedRewiring(in_new[weight.active_positions()], grown, None, trained)


# The plan runs after every step on every layer, so one unstructured block (the common case)
# is chosen on bool masks, without the int64 position tensors (8 bytes a weight) the general
# path builds; both choose the same (tests/test_method_scores.py switches this off).
_MASK_PATH = True


def _top_mask(score: Tensor, k: int, tie_break: TieBreak) -> Tensor:
    """Bool mask of the ``k`` largest of ``score``, chosen as :func:`rigl.selection.prune`
    chooses them in one unstructured block (drop the rest: among ties the larger priority
    is dropped), in O(numel) passes without position tensors. Entries at ``-inf`` (A, when
    choosing B \\ A) are the smallest, so never chosen while ``k`` finite ones remain."""
    return bottomk_keep(score, score.numel() - k, tie_break)
