"""A weight sharded by rows with FSDP2 and its mask, sharded the same way.

The counterpart of :class:`rigl.storage.MaskedWeight` for a DTensor parameter: each rank
masks its local rows of the weight, its gradient and its optimizer state, and takes part
in the exact sharded selection of :mod:`rigl.sharding` on update steps. Counts are global
(one all-reduce when a mask is installed). See :mod:`rigl.fsdp` for the supported order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from rigl.errors import ConfigError
from rigl.optim_state import reset_drifting_state, weight_states
from rigl.patterns import UNSTRUCTURED
from rigl.rewiring import NonFiniteScore, RowScores
from rigl.seam import RewireStats
from rigl.sharding import all_finite, per_block, sharded_drop_and_grow, sum_over


def local_rows(param: Any) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's shard of a ``Shard(0)`` DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return (int(offset[0]) if shape[0] else int(param.shape[0])), int(shape[0])


def _local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor, sharing its storage (in-place ops change the shard)."""
    with torch.no_grad():
        return tensor.to_local()


class ShardedMaskedWeight:
    """A DTensor parameter sharded by rows and its bool mask, sharded the same way.

    ``mask`` is the DTensor view of the local mask ``local_mask`` (rows ``row0 ..
    row0 + local_rows``); counts (``n_active``) are global, kept equal on every rank.
    """

    def __init__(self, name: str, param: Any, local_mask: Tensor, blocks: int = 1) -> None:
        from torch.distributed.tensor import Shard

        if tuple(param.placements) != (Shard(0),):
            raise ConfigError(
                f"{name} is sharded as {tuple(param.placements)}; rigl supports FSDP2's "
                "Shard(0) on a 1-D device mesh (fully_shard without HSDP or tensor parallel)"
            )
        rows = param.shape[0]
        if blocks < 1 or rows % blocks:
            raise ValueError(f"{name}: {rows} rows do not split into {blocks} blocks")
        self.name, self.param, self.blocks = name, param, blocks
        self.group = param.device_mesh.get_group()
        self.row0, self.local_rows = local_rows(param)
        local = _local(param)
        self.local_mask = local_mask.reshape(local.shape).to(device=local.device, dtype=torch.bool)

    # -- mask and counts -------------------------------------------------------------
    @property
    def local_mask(self) -> Tensor:
        return self._local_mask

    @local_mask.setter
    def local_mask(self, mask: Tensor) -> None:
        self._local_mask = mask
        self._inactive = ~mask
        self._n_active = sum_over([int(mask.count_nonzero())], self.group)[0]
        self._digest = _digest(mask)  # what the consistency check compares with

    @property
    def mask(self) -> Tensor:
        """The mask as a DTensor sharded like the weight (each rank: its rows)."""
        return self._sharded(self._local_mask)

    def _sharded(self, local: Tensor) -> Tensor:
        """A DTensor sharded like the weight whose local shard is ``local`` (no copy)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local,
            self.param.device_mesh,
            self.param.placements,
            shape=self.param.shape,
            stride=self.param.stride(),
            run_check=False,
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.numel // self.rows

    @property
    def n_active(self) -> int:
        return self._n_active

    @property
    def density(self) -> float:
        return self._n_active / self.numel

    @property
    def n_nonzero(self) -> int:
        """Non-zero entries of the whole weight now (a collective)."""
        return sum_over([int(_local(self.param).count_nonzero())], self.group)[0]

    # -- every step ----------------------------------------------------------------
    @torch.no_grad()
    def apply_mask(self, optimizer: Any = None, gradient: bool = True) -> None:
        """Inactive local weights (and gradients) to zero, and the optimizer state that a
        zero gradient moves (Adamax's ``exp_inf``) back to its initial value."""
        _local(self.param).mul_(self._local_mask)
        if gradient:
            self.mask_gradient()
        if optimizer is not None and optimizer.state.get(self.param):  # state is a DTensor
            reset_drifting_state(optimizer, self.param, self._sharded(self._inactive))

    @torch.no_grad()
    def mask_gradient(self) -> None:
        if self.param.grad is not None:
            _local(self.param.grad).masked_fill_(self._inactive, 0.0)

    def prepare_step(self, update_due: bool) -> None:
        del update_due

    # -- scores and topology --------------------------------------------------------
    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Global rows [r0, r1) of the gradient; only this rank's rows can be asked for."""
        if self.param.grad is None:
            raise RuntimeError(
                f"the gradient of {self.name} is needed on update steps; call "
                "loss.backward() before sparsifier.step()"
            )
        local = _local(self.param.grad).detach().reshape(self.local_rows, self.cols)
        return local[r0 - self.row0 : r1 - self.row0]

    holds_dense_gradient = True  # this rank's rows of it
    pattern = UNSTRUCTURED  # structured patterns are refused under FSDP (rigl.fsdp)

    def active_values(self) -> Tensor:
        """This rank's active values, in its flat order (the default drop score reads them)."""
        return _local(self.param).detach().reshape(-1)[self._local_mask.reshape(-1)]

    def active_gradient(self) -> Tensor:
        grad = self.param.grad
        if grad is None:
            raise RuntimeError(f"the gradient of {self.name} is needed on update steps")
        return _local(grad).detach().reshape(-1)[self._local_mask.reshape(-1)]

    def rewire(
        self, n_update: int, drop_score: Tensor, grow: RowScores, tie_break: torch.Generator
    ) -> Tensor:
        """This rank's piece of the new flat mask (see :mod:`rigl.sharding`); ``drop_score``
        holds one score per active weight of this rank, in its flat order."""
        if self.local_rows:
            score = grow(self.row0, self.row0 + self.local_rows).reshape(-1)
        else:  # a rank without rows of this layer (more ranks than rows)
            score = torch.zeros(0, dtype=_local(self.param).dtype)
        if not all_finite(score, self.group):
            raise NonFiniteScore(f"non-finite scores in {self.name} (inf/NaN gradient?)")
        if not isinstance(tie_break, torch.Generator):
            raise TypeError("a sharded weight breaks ties with a generator")

        def update(mask: Tensor, drop: Tensor, grow_: Tensor, n: int) -> Tensor:
            return sharded_drop_and_grow(mask, drop, grow_, n, tie_break, self.group)

        start = self.row0 * self.cols
        local_mask = self._local_mask.flatten()
        drop = torch.zeros(local_mask.numel(), dtype=drop_score.dtype, device=drop_score.device)
        drop[local_mask] = drop_score  # only the active entries are read
        flat = (local_mask, drop, score)
        return per_block(update, start, self.numel, self.blocks, n_update, *flat)

    def prune(self, n_keep: int, score: Tensor, tie_break: Any) -> Tensor:
        raise ConfigError(
            f"{self.name}: pruning is not supported on a model sharded with fully_shard "
            "(the methods that declare supports_sharding)"
        )

    @torch.no_grad()
    def install(
        self, new_mask: Tensor, optimizer: Any, grown_gradient: bool = False
    ) -> RewireStats:
        """Install this rank's piece of the new mask (see ``MaskedWeight.install``)."""
        new_mask = new_mask.reshape(self._local_mask.shape).to(torch.bool)
        grown, dropped = new_mask & ~self._local_mask, self._local_mask & ~new_mask
        changed = grown | dropped
        _local(self.param).masked_fill_(changed, 0.0)
        for value, fresh in weight_states(optimizer, self.param).values():
            _local(value).masked_fill_(changed, fresh)
        self.local_mask = new_mask
        grad = self.param.grad
        if grad is not None and not grown_gradient:
            _local(grad).masked_fill_(grown, 0.0)
        n_dropped, n_grown = sum_over(
            [int(dropped.count_nonzero()), int(grown.count_nonzero())], self.group
        )
        return RewireStats(self.name, self._n_active, n_dropped, n_grown)

    # -- checkpoints ------------------------------------------------------------------
    def topology_state(self) -> Tensor:
        """The mask as a DTensor (a sharded state dict entry for DCP)."""
        return self.mask.clone()

    def check_topology(self, mask: Tensor) -> Tensor:
        if tuple(mask.shape) != self.shape:
            raise ConfigError(
                f"state dict mask {self.name} has shape {tuple(mask.shape)}, "
                f"the model's weight has {self.shape}: it belongs to a different model"
            )
        return mask

    def load_topology(self, mask: Tensor, optimizer: Any = None) -> None:
        """Install a checkpoint's mask: a DTensor (DCP) or a whole plain mask, of which
        this rank keeps its rows."""
        del optimizer
        mask = self.check_topology(mask)
        local = _local(mask) if hasattr(mask, "to_local") else mask[self._row_slice()]
        self.local_mask = local.to(torch.bool).clone()
        self.apply_mask()

    def _row_slice(self) -> slice:
        return slice(self.row0, self.row0 + self.local_rows)

    # -- inspection -------------------------------------------------------------------
    def shard_state(self) -> str:
        """What :func:`rigl.distributed.fingerprint` compares: whether the local mask is
        still the one the last update installed (a rank's shard is its own, so shards are
        compared with their own record, not with another rank's)."""
        now = _digest(self._local_mask)
        return "as installed" if now == self._digest else f"changed since installed ({now})"

    @torch.no_grad()
    def violations(self, optimizer: Any) -> list[str]:
        """Broken invariants, counted over every rank (a collective)."""
        found = []
        active, outside = sum_over(
            [
                int(self._local_mask.count_nonzero()),
                int(_local(self.param)[self._inactive].count_nonzero()),
            ],
            self.group,
        )
        if active != self._n_active:
            found.append(f"its mask has {active} active weights, its count says {self._n_active}")
        if outside:
            found.append(f"{outside} inactive weights are non-zero")
        for key, (value, fresh) in weight_states(optimizer, self.param).items():
            stale = int((_local(value)[self._inactive] != fresh).count_nonzero())
            if sum_over([stale], self.group)[0]:
                found.append(f"optimizer state {key!r} is not its initial value ({fresh})")
        return found


def _digest(mask: Tensor) -> str:
    flat = mask.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()[:16]
