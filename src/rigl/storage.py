"""Masked-dense storage: the ordinary dense parameter times a bool mask.

One of the two implementations of :class:`rigl.seam.SparseStorage` (the other is the
compressed :class:`rigl.sparse.storage.SparseWeight`). The algorithms read scores through
the seam and hand back a :class:`rigl.rewiring.Rewiring`; turning it into a mask is this
module's business.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl import selection
from rigl.errors import ConfigError
from rigl.optim_state import reset_drifting_state, reset_optimizer_state, weight_states
from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.patterns import violations as pattern_violations
from rigl.rewiring import (
    Grid,
    MissingGradient,
    NonFiniteScore,
    Rewiring,
    RowScores,
    check_finite,
)
from rigl.seam import RewireStats
from rigl.topology import TieBreak, split_evenly

# re-exported: they lived here before the seam had its own module
__all__ = ["MaskedWeight", "NonFiniteScore", "RewireStats", "RowScores", "check_finite"]


class MaskedWeight:
    """A dense ``nn.Parameter`` with a bool ``mask`` of the same shape (a
    :class:`rigl.seam.SparseStorage`).

    Inactive entries are exactly zero after every :meth:`apply_mask`; the full dense
    gradient is available for growth (RigL's ``|∇θ L|``). With ``blocks`` > 1 the rows form
    that many equal blocks (q, k, v of a packed projection) that are rewired and pruned
    each on its own, so every block keeps its count.
    """

    def __init__(
        self,
        name: str,
        param: nn.Parameter,
        mask: Tensor,
        blocks: int = 1,
        pattern: Pattern = UNSTRUCTURED,
    ) -> None:
        if mask.shape != param.shape:
            raise ValueError(
                f"mask of {name} has shape {tuple(mask.shape)}, weight {tuple(param.shape)}"
            )
        if blocks < 1 or param.shape[0] % blocks:
            raise ValueError(f"{name}: {param.shape[0]} rows do not split into {blocks} blocks")
        self.name = name
        self.param = param
        self.blocks = blocks
        self.pattern = pattern  # every mask keeps it (rigl.patterns)
        self.mask = mask.to(device=param.device, dtype=torch.bool)

    @property
    def mask(self) -> Tensor:
        """Bool tensor shaped like the weight, True at the active weights."""
        return self._mask

    @mask.setter
    def mask(self, mask: Tensor) -> None:
        self._mask = mask
        self._inactive = ~mask  # kept: every step fills the inactive positions
        self._active: Tensor | None = None  # its flat positions, when first asked for
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
            self._zero_gradient(self._inactive)
        reset_drifting_state(optimizer, self.param, self._untrained)

    @torch.no_grad()
    def mask_gradient(self) -> None:
        """Before the optimizer step: zero the gradient of the inactive weights."""
        self._zero_gradient(self._inactive)

    def _zero_gradient(self, where: Tensor) -> None:
        """The gradient to zero at ``where``: filled, not multiplied, so an inf there does
        not become a NaN that the optimizer step spreads."""
        grad = self.param.grad
        if grad is None:
            return
        if grad.is_sparse:  # nn.Embedding(sparse=True): the gradient stays sparse
            grad.mul_(~where)
        else:
            grad.masked_fill_(where, 0.0)

    _untrained_label = "inactive"

    @property
    def _untrained(self) -> Tensor:
        """Where the optimizer state must stay fresh: the inactive positions (a storage
        that trains more than it uses, :class:`rigl.reserve.ReservedWeight`, fewer)."""
        return self._inactive

    # -- scores (see rigl.seam.SparseStorage) ------------------------------------------
    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.numel // self.shape[0]

    @property
    def grid(self) -> Grid:
        """Grow scores are read in one call: the dense gradient exists anyway."""
        return Grid(self.rows, self.cols, self.blocks, None, self.name, self.pattern)

    holds_dense_gradient = True

    def active_positions(self) -> Tensor:
        """Sorted int64 flat positions of the active weights (computed once per mask)."""
        if self._active is None:
            self._active = self._mask.reshape(-1).nonzero().squeeze(1)
        return self._active

    def active_values(self) -> Tensor:
        return self.param.detach().reshape(-1)[self.active_positions()]

    def active_gradient(self) -> Tensor:
        return self._needed_gradient().reshape(-1)[self.active_positions()]

    def dense_gradient(self) -> Tensor | None:
        """The gradient on the current batch, shaped like the weight; a sparse gradient
        (``nn.Embedding(sparse=True)``: only the rows looked up) is densified."""
        grad = self.param.grad
        if grad is None:
            return None
        return grad.detach().to_dense() if grad.is_sparse else grad.detach()

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient viewed as (rows, cols)."""
        return self._needed_gradient().reshape(self.rows, self.cols)[r0:r1]

    def gradient_at(self, flat: Tensor) -> Tensor:
        """The dense gradient at the flat positions ``flat``."""
        return self._needed_gradient().reshape(-1)[flat]

    def _needed_gradient(self) -> Tensor:
        grad = self.dense_gradient()
        if grad is None:
            raise MissingGradient(self.name)
        return grad

    # -- topology -------------------------------------------------------------------
    def rewire(
        self, n_update: int, drop_score: Tensor, grow: RowScores, tie_break: TieBreak
    ) -> Rewiring:
        """The plan of one drop-and-grow update (:func:`rigl.selection.rewire`)."""
        return selection.rewire(
            self.active_positions(), drop_score, grow, self.grid, n_update, tie_break
        )

    @torch.no_grad()
    def install(
        self,
        rewiring: Rewiring,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
    ) -> RewireStats:
        """Install ``rewiring`` as a new mask: grown weights start at their
        ``grown_values`` (zero by default) with fresh optimizer state, dropped weights
        become zero (their state fresh too); kept weights keep value, state and gradient.
        Grown weights keep their gradient if ``grown_gradient``, else it is zeroed; the
        dropped ones' is zeroed after the step (:meth:`apply_mask`)."""
        new_mask = self._mask_after(rewiring)
        grown = new_mask & ~self.mask
        dropped = self.mask & ~new_mask
        self.param.masked_fill_(grown | dropped, 0.0)
        reset_optimizer_state(optimizer, self.param, grown | dropped)
        if rewiring.grown_values is not None:  # a regrown position keeps its value
            start = torch.zeros(self.numel, dtype=self.param.dtype, device=self.param.device)
            start[rewiring.grown] = rewiring.grown_values.to(self.param.dtype)
            self.param.copy_(torch.where(grown, start.reshape(self.shape), self.param))
        self.mask = new_mask
        if not grown_gradient:
            self._zero_gradient(grown)
        return RewireStats(
            self.name, self._n_active, int(dropped.count_nonzero()), int(grown.count_nonzero())
        )

    def _mask_after(self, rewiring: Rewiring) -> Tensor:
        """The bool mask ``rewiring`` leaves: the kept weights and the grown ones."""
        flat = self._mask.reshape(-1).clone()
        flat[self.active_positions()[~rewiring.keep]] = False
        flat[rewiring.grown] = True
        return flat.reshape(self.shape)

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
        found += pattern_violations(self.pattern, self.active_positions(), self.rows, self.cols)
        inactive, untrained = ~self.mask, self._untrained
        outside = int(self.param.detach()[inactive].count_nonzero())
        if outside:
            found.append(
                f"{outside} inactive weights are non-zero (an optimizer step taken outside "
                "the sparsifier, or weights written after it?)"
            )
        for key, (value, fresh) in weight_states(optimizer, self.param).items():
            stale = value.to_dense()[untrained] != fresh  # what the optimizer starts at
            count = int(stale.count_nonzero())
            if count:
                found.append(
                    f"optimizer state {key!r} is not its initial value ({fresh}) at "
                    f"{count} {self._untrained_label} positions"
                )
        return found
