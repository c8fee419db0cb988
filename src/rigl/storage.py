"""Sparse weight storage: the seam between algorithms and tensors.

An algorithm asks a sparse weight for drop scores (magnitudes), gives it grow scores
and asks it to rewire; how the weight is stored is the weight's business. This module
holds the masked-dense storage: the ordinary dense parameter times a bool mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rigl.errors import ConfigError
from rigl.optim_state import reset_drifting_state, reset_optimizer_state, weight_states
from rigl.sharding import all_finite, is_sharded
from rigl.topology import TieBreak, drop_and_grow, magnitude_prune, split_evenly

# Grow scores of the rows [r0, r1) of a weight viewed as (rows, cols), flattened to
# ((r1 - r0) * cols,). A masked weight asks for all rows at once; a compressed weight scans
# row blocks, so a dense score matrix never has to exist.
RowScores = Callable[[int, int], Tensor]


class NonFiniteScore(Exception):
    """A score was inf/NaN: the whole topology update is skipped."""


def check_finite(score: Tensor | None, name: str) -> None:
    if score is None or score.numel() == 0:
        return
    if is_sharded(score):  # an FSDP2 gradient: each rank checks its shard, all agree
        if not all_finite(score.to_local(), score.device_mesh.get_group()):
            raise NonFiniteScore(f"non-finite scores in {name} (inf/NaN gradient?)")
        return
    if score.is_sparse:  # a sparse gradient (nn.Embedding(sparse=True)): its stored values
        score = score.coalesce().values()
    # One pass: NaN propagates to both ends, an inf is one of them (isfinite().all() is two
    # passes and a bool tensor, about 20x slower on a large score).
    low, high = torch.aminmax(score.detach().reshape(-1))
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise NonFiniteScore(f"non-finite scores in {name} (inf/NaN gradient?)")


@dataclass(frozen=True)
class RewireStats:
    """What one topology update did to one layer."""

    name: str
    n_active: int
    n_dropped: int  # active before, inactive after
    n_grown: int  # inactive before, active after (equals n_dropped for DST methods)


class MaskedWeight:
    """A dense ``nn.Parameter`` with a bool ``mask`` of the same shape.

    Inactive entries are exactly zero after every :meth:`apply_mask`; the full dense
    gradient is available for growth (RigL's ``|∇θ L|``). With ``blocks`` > 1 the rows form
    that many equal blocks (q, k, v of a packed projection) that are rewired and pruned
    each on its own, so every block keeps its count.
    """

    def __init__(self, name: str, param: nn.Parameter, mask: Tensor, blocks: int = 1) -> None:
        if mask.shape != param.shape:
            raise ValueError(
                f"mask of {name} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
            )
        if blocks < 1 or param.shape[0] % blocks:
            raise ValueError(f"{name}: {param.shape[0]} rows do not split into {blocks} blocks")
        self.name = name
        self.param = param
        self.blocks = blocks
        self.mask = mask.to(device=param.device, dtype=torch.bool)

    @property
    def mask(self) -> Tensor:
        """Bool tensor shaped like the weight, True at the active weights."""
        return self._mask

    @mask.setter
    def mask(self, mask: Tensor) -> None:
        self._mask = mask
        self._inactive = ~mask  # kept: every step fills the inactive positions
        self._n_active = int(mask.count_nonzero())

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_active(self) -> int:
        return self._n_active

    @property
    def density(self) -> float:
        return self._n_active / self.numel

    # -- every step ----------------------------------------------------------------
    @torch.no_grad()
    def apply_mask(
        self, optimizer: torch.optim.Optimizer | None = None, gradient: bool = True
    ) -> None:
        """Inactive weights to zero (and their gradient, if ``gradient``), and the
        optimizer state that moves under a zero gradient (Adamax's ``exp_inf``) back to
        its initial value; other state stays fresh there by itself."""
        self.param.mul_(self.mask)
        if gradient:
            self.mask_gradient()
        reset_drifting_state(optimizer, self.param, self._inactive)

    @torch.no_grad()
    def mask_gradient(self) -> None:
        """Zero the gradient of the inactive weights: filled, not multiplied, so an inf at
        an inactive position does not become a NaN that the optimizer step spreads."""
        grad = self.param.grad
        if grad is None:
            return
        if grad.is_sparse:  # nn.Embedding(sparse=True): the gradient stays sparse
            grad.mul_(self.mask)
        else:
            grad.masked_fill_(self._inactive, 0.0)

    # -- scores ---------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.numel // self.shape[0]

    def magnitude(self) -> Tensor:
        """Drop score: ``|θ|``, flat."""
        return self.param.detach().abs().flatten()

    def dense_gradient(self) -> Tensor | None:
        """The gradient on the current batch, shaped like the weight; a sparse gradient
        (``nn.Embedding(sparse=True)``: only the rows looked up) is densified."""
        grad = self.param.grad
        if grad is None:
            return None
        return grad.detach().to_dense() if grad.is_sparse else grad.detach()

    def gradient(self) -> Tensor | None:
        """Dense gradient of the (masked) weight on the current batch, flat."""
        grad = self.dense_gradient()
        return None if grad is None else grad.flatten()

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient viewed as (rows, cols)."""
        grad = self.dense_gradient()
        if grad is None:
            raise RuntimeError(
                f"the gradient of {self.name} is needed on update steps; call "
                "loss.backward() before sparsifier.step()"
            )
        return grad.reshape(self.rows, self.cols)[r0:r1]

    # -- topology -------------------------------------------------------------------
    def rewire(self, n_update: int, grow: RowScores, tie_break: TieBreak) -> Tensor:
        """New flat mask: drop the ``n_update`` smallest magnitudes, grow by ``grow``."""
        score = grow(0, self.rows).reshape(-1)
        check_finite(score, self.name)
        return drop_and_grow(
            self.mask.flatten(), self.magnitude(), score, n_update, tie_break, self.blocks
        )

    def prune(self, n_keep: int, score: Tensor, tie_break: TieBreak) -> Tensor:
        """New flat mask keeping the ``n_keep`` active weights of largest ``score``."""
        return magnitude_prune(self.mask.flatten(), score, n_keep, tie_break, self.blocks)

    @torch.no_grad()
    def set_topology(
        self,
        new_mask: Tensor,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
    ) -> RewireStats:
        """Install ``new_mask``: grown weights start at zero with fresh optimizer state,
        dropped weights become zero (their state fresh too); kept weights keep value,
        state and gradient. Grown weights keep their gradient if ``grown_gradient``, else
        it is zeroed; the dropped ones' is zeroed after the step (:meth:`apply_mask`)."""
        new_mask = new_mask.reshape(self.shape).to(torch.bool)
        grown = new_mask & ~self.mask
        dropped = self.mask & ~new_mask
        self.param.masked_fill_(grown | dropped, 0.0)
        reset_optimizer_state(optimizer, self.param, grown | dropped)
        self.mask = new_mask
        grad = self.param.grad
        if grad is not None and not grown_gradient:
            if grad.is_sparse:
                grad.mul_(~grown)
            else:
                grad.masked_fill_(grown, 0.0)
        return RewireStats(
            self.name, self._n_active, int(dropped.count_nonzero()), int(grown.count_nonzero())
        )

    # -- checkpoints ------------------------------------------------------------------
    def topology_state(self) -> Tensor:
        """What a checkpoint stores: the bool mask."""
        return self.mask.detach().cpu().clone()

    def check_topology(self, mask: Tensor) -> Tensor:
        """The mask of a checkpoint, or a ConfigError if it does not fit this weight."""
        if tuple(mask.shape) != self.shape:
            raise ConfigError(
                f"state dict mask {self.name} has shape {tuple(mask.shape)}, "
                f"the model's weight has {self.shape}: it belongs to a different model"
            )
        return mask

    def load_topology(self, mask: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install a checkpoint's mask. The optimizer state is dense, like the weight, so it
        keeps its shape whatever the active count (``optimizer`` is for the compressed
        storage, whose state tensors have one entry per active weight)."""
        del optimizer
        mask = self.check_topology(mask)
        self.mask = mask.to(device=self.param.device, dtype=torch.bool).clone()
        self.apply_mask()

    def prepare_step(self, update_due: bool) -> None:
        """Called before each step's backward; a masked weight needs nothing."""
        del update_due

    # -- inspection -------------------------------------------------------------------
    @property
    def n_nonzero(self) -> int:
        """Non-zero entries of the weight as it is now (measured, not the bookkeeping)."""
        return int(self.param.detach().count_nonzero())

    @torch.no_grad()
    def violations(self, optimizer: torch.optim.Optimizer | None) -> list[str]:
        """What breaks the invariants now: the mask's count against the bookkeeping (and
        per block), non-zero weights and optimizer state at inactive positions."""
        found = []
        n = int(self.mask.count_nonzero())
        if n != self._n_active:
            found.append(f"its mask has {n} active weights, its count says {self._n_active}")
        if self.blocks > 1:
            per_block = self.mask.reshape(self.blocks, -1).sum(1).tolist()
            if per_block != split_evenly(n, self.blocks):
                found.append(f"its blocks hold {per_block} active weights, not an even split")
        inactive = ~self.mask
        outside = int(self.param.detach()[inactive].count_nonzero())
        if outside:
            found.append(
                f"{outside} inactive weights are non-zero (an optimizer step taken outside "
                "the sparsifier, or weights written after it?)"
            )
        for key, (value, fresh) in weight_states(optimizer, self.param).items():
            stale = value.to_dense()[inactive] != fresh  # what the optimizer starts at
            count = int(stale.count_nonzero())
            if count:
                found.append(
                    f"optimizer state {key!r} is not its initial value ({fresh}) at "
                    f"{count} inactive positions"
                )
        return found
