"""Compressed sparse storage: the second implementation of :class:`rigl.seam.SparseStorage`.

A :class:`SparseWeight` wraps a :class:`~rigl.sparse.SparseLinear`: only the active values
exist, so a drop score is a tensor of ``n_active`` entries, and the grow scores are read
block of output rows by block (:attr:`SparseWeight.grid`), one matrix product each, by
the bounded-memory scan of :mod:`rigl.blockwise`. No dense score, mask or gradient matrix
is built. A :class:`~rigl.rewiring.Rewiring` is installed by merging two sorted runs (the
kept positions and the grown ones) with the compiled ``merge_plan`` where it exists.

Over 300 lines: one class implementing every member of the seam's protocol on the
compressed layout (scores, install, checkpoints, violations); the selection maths it
calls is already in :mod:`rigl.selection` and :mod:`rigl.blockwise`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rigl import selection
from rigl.config import ConfigError
from rigl.optim_state import weight_states
from rigl.patterns import UNSTRUCTURED, Pattern
from rigl.patterns import violations as pattern_violations
from rigl.rewiring import Grid, MissingGradient, Rewiring, RowScores
from rigl.seam import RewireStats
from rigl.sparse import kernels
from rigl.sparse.index import _sort
from rigl.sparse.linear import SparseLinear
from rigl.topology import TieBreak

# Grow scores per block (16 MB of float32): for a wide layer (65536 inputs) that is 64
# rows, enough for the gradient GEMM of a block to run near full speed.
BLOCK_ELEMENTS = 1 << 22


class SparseWeight:
    """The weight of a :class:`SparseLinear` (or ``SparseConv2d``/``1d``: its kernel viewed as
    the matrix ``(out, in*kh*kw)``), seen by the algorithms."""

    blocks = 1  # a packed q/k/v projection is never compressed
    holds_dense_gradient = False  # each block of the dense gradient is a matrix product

    def __init__(self, name: str, layer: SparseLinear, pattern: Pattern = UNSTRUCTURED) -> None:
        self.name = name
        self.layer = layer
        self.pattern = pattern  # every topology keeps it; stored as any other (CSR)
        self._active: tuple[object, Tensor] | None = None  # (index, its flat positions)

    # -- shape and counts --------------------------------------------------------------
    @property
    def param(self) -> torch.nn.Parameter:
        return self.layer.values

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.shape

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense layer's weight shape (``shape`` is the matrix view the algorithms use)."""
        return self.layer.weight_shape

    @property
    def rows(self) -> int:
        return self.layer.out_features

    @property
    def cols(self) -> int:
        return self.layer.in_features

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def n_active(self) -> int:
        return self.layer.n_active

    @property
    def density(self) -> float:
        return self.n_active / self.numel

    @property
    def mask(self) -> Tensor:
        """Dense bool mask, built on demand (for inspection; costs ``numel`` bytes)."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=self.param.device)
        mask[self.layer.active_indices()] = True
        return mask.reshape(self.layer.weight_shape)  # a convolution's: (out, in, kh, kw)

    @property
    def grid(self) -> Grid:
        """Grow scores are read :data:`BLOCK_ELEMENTS` at a time (whole rows, at least one)."""
        block_rows = max(1, BLOCK_ELEMENTS // max(self.cols, 1))
        return Grid(self.rows, self.cols, 1, block_rows, self.name, self.pattern)

    # -- every step: nothing to mask, inactive weights do not exist ----------------------
    def apply_mask(
        self, optimizer: torch.optim.Optimizer | None = None, gradient: bool = True
    ) -> None:
        pass

    def mask_gradient(self) -> None:
        pass

    def prepare_step(self, update_due: bool) -> None:
        """Keep the next backward's input and output gradient only when an update is due."""
        self.layer.keep_grow_inputs(update_due)

    # -- scores ------------------------------------------------------------------------
    def active_positions(self) -> Tensor:
        """The layer's active flat positions, computed once per index (planning and
        install both need them in an update)."""
        index = self.layer._index
        if self._active is None or self._active[0] is not index:
            self._active = (index, self.layer.active_indices())
        return self._active[1]

    def active_values(self) -> Tensor:
        """The values themselves: they are stored in flat order."""
        return self.param.detach()

    def active_gradient(self) -> Tensor:
        grad = self.param.grad
        if grad is None:
            raise MissingGradient(self.name)
        return grad.detach()

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient ``dy^T x``, accumulated over the update step's
        backward calls (averaged over the data-parallel ranks, like DDP's ``.grad``)."""
        self._check_kept_batch()
        return _mean_over_ranks(self.layer.grad_rows(r0, r1))

    def gradient_at(self, flat: Tensor) -> Tensor:
        """The dense gradient at the flat positions ``flat`` only (an SDDMM; averaged over
        the data-parallel ranks)."""
        self._check_kept_batch()
        return _mean_over_ranks(self.layer.grad_at(flat))

    def _check_kept_batch(self) -> None:
        """MissingGradient when this update step kept no batch: the layer had no backward."""
        grow = self.layer._grow
        if grow.enabled and not grow.xts:
            raise MissingGradient(self.name)

    # -- topology ----------------------------------------------------------------------
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
        """Install ``rewiring``: the kept positions and the grown ones, two sorted runs,
        are merged (knowing the old slot of every kept weight); see :meth:`_move`."""
        old_flat = self.active_positions()
        if rewiring.keep.numel() != old_flat.numel():
            raise ValueError(
                f"{self.name}: the rewiring keeps or drops {rewiring.keep.numel()} weights, "
                f"the layer has {old_flat.numel()} (planned on another topology?)"
            )
        merged, slot = _merge_plan(
            old_flat, rewiring.keep, rewiring.grown, self.numel, self.layer.kernels
        )
        start = None
        if rewiring.grown_values is not None:
            start = _values_at(rewiring.grown, rewiring.grown_values, merged)
        return self._move(merged, slot, optimizer, grown_gradient, start)

    def _move(
        self,
        merged: Tensor,
        slot: Tensor,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
        start: Tensor | None = None,
    ) -> RewireStats:
        """Make the sorted ``merged`` the active set; ``slot``: each entry's slot in the old
        one, or -1. Positions that stay keep value, optimizer state and gradient; new ones
        start at ``start`` (or zero) with fresh state (what the optimizer starts it at) and,
        if ``grown_gradient``, the dense gradient there, else zero (as on the masked
        backend)."""
        self._active = None
        survived = slot >= 0
        slot = slot.clamp(min=0)
        values = self.param.detach()
        fresh_value = torch.zeros((), dtype=values.dtype) if start is None else start
        new_values = torch.where(survived, values[slot], fresh_value.to(values.dtype))
        states = weight_states(optimizer, self.param)
        new_states = {
            key: torch.where(survived, s[slot], fresh) for key, (s, fresh) in states.items()
        }
        new_grad = self._moved_gradient(survived, slot, merged, grown_gradient)
        self.layer.set_sorted_topology(merged, new_values)
        for key, new in new_states.items():
            if states[key][0].shape == new.shape:
                states[key][0].copy_(new)
            else:  # the active count changed (a loaded topology): the state is resized
                optimizer.state[self.param][key] = new
        if new_grad is not None:
            self.param.grad = new_grad
        n_grown = int((~survived).count_nonzero())
        return RewireStats(self.name, self.n_active, n_grown, n_grown)

    def _moved_gradient(
        self, survived: Tensor, slot: Tensor, merged: Tensor, grown_gradient: bool
    ) -> Tensor | None:
        """``.grad`` in the new slot order: kept weights keep theirs; grown ones get the
        dense gradient at their position if ``grown_gradient``, else zero."""
        grad = self.param.grad
        if grad is None:
            return None
        new_grad = torch.where(survived, grad[slot], torch.zeros((), dtype=grad.dtype))
        grown = (~survived).nonzero().squeeze(1)
        if grown_gradient and grown.numel():
            new_grad[grown] = self.gradient_at(merged[grown]).to(grad.dtype)
        return new_grad

    # -- inspection --------------------------------------------------------------------
    @property
    def n_nonzero(self) -> int:
        """Non-zero active values as they are now (an active weight may be exactly zero)."""
        return int(self.param.detach().count_nonzero())

    @torch.no_grad()
    def violations(self, optimizer: torch.optim.Optimizer | None) -> list[str]:
        """What breaks the invariants now: values against the index, the index itself
        (sorted, unique, in range), optimizer state not of the values' size."""
        found = []
        active = self.layer.active_indices()
        if active.numel() != self.param.numel():
            found.append(f"{self.param.numel()} values but {active.numel()} indices")
        if active.numel() and not bool((active[1:] > active[:-1]).all()):
            found.append("its indices are not sorted and unique")
        if active.numel() and (int(active.min()) < 0 or int(active.max()) >= self.numel):
            found.append(f"its indices leave the shape {self.shape}")
        found += pattern_violations(self.pattern, active, self.rows, self.cols)
        state = optimizer.state.get(self.param, {}) if optimizer is not None else {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.dim() and value.shape != self.param.shape:
                found.append(
                    f"optimizer state {key!r} has shape {tuple(value.shape)}, "
                    f"the values {tuple(self.param.shape)}"
                )
        return found

    # -- checkpoints -------------------------------------------------------------------
    def topology_state(self) -> Tensor:
        """What a checkpoint stores: the sorted flat indices of the active weights (int64)."""
        return self.layer.active_indices().detach().cpu().clone()

    def check_topology(self, state: Tensor) -> Tensor:
        """The sorted flat indices of a checkpoint's topology, or a ConfigError naming this
        weight: int indices (from this backend) or a bool mask (from the masked backend)."""
        return checked_positions(state, self.name, self.shape, self.layer.weight_shape)

    @torch.no_grad()
    def load_topology(self, state: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install a checkpoint's topology (see :meth:`check_topology`), of any active count,
        as an update would: positions that stay active keep their value and optimizer
        state, new ones start at zero, so the optimizer state follows a change of the
        active count (the masked backend's state is dense and stays in place, with the
        same effect)."""
        flat = self.check_topology(state).to(self.param.device)
        merged = _sort(flat.reshape(-1).to(torch.int64), self.numel)[0]
        self._move(merged, _old_slots(self.active_positions(), merged), optimizer)


def checked_positions(
    state: Tensor, name: str, shape: tuple[int, int], weight_shape: tuple[int, ...] | None = None
) -> Tensor:
    """The sorted flat positions of a checkpoint's topology ``state`` for the weight ``name``
    of ``shape`` (viewed as a matrix; ``weight_shape``: its own shape, a convolution's
    kernel): int indices (compressed backend) or a bool mask of either shape (masked
    backend); a ConfigError naming the weight when it does not fit."""
    numel = shape[0] * shape[1]
    where = f"state dict masks[{name!r}]"
    if state.dtype == torch.bool:
        if tuple(state.shape) not in (shape, weight_shape or shape):
            raise ConfigError(
                f"{where} has shape {tuple(state.shape)}, the model's weight has "
                f"{weight_shape or shape}: it belongs to a different model"
            )
        return state.reshape(-1).nonzero().squeeze(1)
    if state.dtype not in (torch.int32, torch.int64) or state.dim() != 1:
        raise ConfigError(
            f"{where} has dtype {state.dtype} and shape {tuple(state.shape)}; expected "
            "1-D int64 flat indices (or a bool mask)"
        )
    flat = torch.sort(state.to(torch.int64)).values
    if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= numel):
        bad = int(flat[0]) if int(flat[0]) < 0 else int(flat[-1])
        raise ConfigError(f"{where} holds index {bad}, outside [0, {numel}) of shape {shape}")
    if bool((flat[1:] == flat[:-1]).any()):
        raise ConfigError(f"{where} holds a duplicate index")
    return flat


def _mean_over_ranks(grad: Tensor) -> Tensor:
    """``grad`` averaged over the ranks of the default process group (a no-op in one
    process). DDP all-reduces the gradient of the active values only; the grow scores come
    from each rank's own batch, so they are all-reduced here, block by block, and every
    rank then selects the same connections (every rank scans the same blocks in the same
    order, since the reduced scores are identical)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grad


def _old_slots(old_flat: Tensor, new_flat: Tensor) -> Tensor:
    """Position of each ``new_flat`` entry in the sorted ``old_flat``, or -1 if absent."""
    if old_flat.numel() == 0:
        return torch.full_like(new_flat, -1)
    slot = torch.searchsorted(old_flat, new_flat).clamp_(max=old_flat.numel() - 1)
    return torch.where(old_flat[slot] == new_flat, slot, -1)


def _merge_plan(
    old_flat: Tensor, keep: Tensor, grown: Tensor, numel: int, use: str | None = None
) -> tuple[Tensor, Tensor]:
    """The new active set, sorted: ``old_flat[keep]`` merged with ``grown``; and each
    entry's slot in the sorted ``old_flat`` (kept, or dropped and grown again), else -1.
    ``use`` picks the compiled merge or stock torch as in :mod:`rigl.sparse.kernels`."""
    grown = _sort(grown.to(torch.int64), numel)[0]
    ext = kernels._pick(use)
    if ext is not None and old_flat.device.type == "cpu":
        return tuple(ext.merge_plan(old_flat.contiguous(), keep.contiguous(), grown))
    kept_slot = keep.nonzero().squeeze(1)
    merged, order = torch.sort(torch.cat([old_flat[kept_slot], grown]))
    return merged, torch.cat([kept_slot, _old_slots(old_flat, grown)])[order]


def _values_at(grown: Tensor, values: Tensor, merged: Tensor) -> Tensor:
    """``values`` (one per ``grown`` position) spread over the sorted ``merged`` positions;
    zero where a position is not grown (kept entries take their old value anyway)."""
    order = torch.argsort(grown)
    grown, values = grown[order], values[order]
    if grown.numel() == 0:
        return torch.zeros(merged.shape, dtype=values.dtype, device=merged.device)
    at = torch.searchsorted(grown, merged).clamp_(max=grown.numel() - 1)
    return torch.where(grown[at] == merged, values[at], torch.zeros((), dtype=values.dtype))
