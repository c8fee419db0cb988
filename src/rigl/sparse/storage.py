"""Compressed sparse storage behind the same seam as :class:`rigl.storage.MaskedWeight`.

A :class:`SparseWeight` wraps a :class:`~rigl.sparse.SparseLinear`: only the active values
exist, so drop works on them directly, and growth scans the grow scores block by block of
output rows, keeping a running top-k. No dense score, mask or gradient matrix is built.

Selection is the same function of (scores, seed) as on the masked backend, so the two
backends choose identical masks: the k-th largest value ``v`` is found in a first pass;
if entries tied at ``v`` must be chosen between, a second pass visits the tied entries in
flat order and draws their priorities from the same generator (torch's CPU generator is
split-consistent: ``rand(a)`` then ``rand(b)`` equals ``rand(a + b)``), keeping a running
best by priority, so memory stays bounded even when millions of scores tie at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rigl.config import ConfigError
from rigl.sparse.linear import SparseLinear
from rigl.storage import RewireStats, RowScores, check_finite
from rigl.topology import TieBreak, _priority, random_indices_outside, topk_indices

# Grow scores per block (16 MB of float32): for a wide layer (65536 inputs) that is 64
# rows, enough for the gradient GEMM of a block to run near full speed.
BLOCK_ELEMENTS = 1 << 22


class SparseWeight:
    """The weight of a :class:`SparseLinear`, seen by the algorithms."""

    def __init__(self, name: str, layer: SparseLinear) -> None:
        self.name = name
        self.layer = layer

    # -- shape and counts --------------------------------------------------------------
    @property
    def param(self) -> torch.nn.Parameter:
        return self.layer.values

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.shape

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
        return mask.reshape(self.shape)

    # -- every step: nothing to mask, inactive weights do not exist ----------------------
    def apply_mask(self) -> None:
        pass

    def mask_gradient(self) -> None:
        pass

    def prepare_step(self, update_due: bool) -> None:
        """Keep the next backward's input and output gradient only when an update is due."""
        self.layer.keep_grow_inputs(update_due)

    # -- scores ------------------------------------------------------------------------
    def magnitude(self) -> Tensor:
        """``|θ|`` of the active weights, in flat-index order."""
        return self.param.detach().abs()

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient ``dy^T x`` of the last update-step batch."""
        return self.layer.grad_rows(r0, r1)

    def gradient_at(self, flat: Tensor) -> Tensor:
        """The dense gradient at the flat positions ``flat`` only (an SDDMM)."""
        return self.layer.grad_at(flat)

    # -- topology ----------------------------------------------------------------------
    def rewire(self, n_update: int, grow: RowScores, tie_break: TieBreak) -> Tensor:
        """New active flat indices: drop the ``n_update`` smallest, grow the best ``grow``."""
        n_update = min(int(n_update), self.n_active)
        kept = self._kept_after_drop(n_update, tie_break)
        grown = _blockwise_topk(grow, self.rows, self.cols, kept, n_update, tie_break, self.name)
        return torch.cat([kept, grown])

    def rewire_sampled(
        self,
        n_update: int,
        scores_at: Callable[[Tensor], Tensor],
        n_candidates: int,
        generator: torch.Generator,
    ) -> Tensor:
        """Like :meth:`rewire`, but grow the best ``n_update`` by ``scores_at(flat)`` among
        ``n_candidates`` positions drawn uniformly from those not kept (the just-dropped
        included): O(n_candidates) scores instead of a scan of every position."""
        n_update = min(int(n_update), self.n_active)
        kept = self._kept_after_drop(n_update, generator)
        free = self.numel - kept.numel()
        candidates = random_indices_outside(
            self.numel, min(max(n_candidates, n_update), free), kept.cpu(), generator
        ).to(kept.device)
        score = scores_at(candidates)
        check_finite(score, self.name)
        grown = candidates[topk_indices(score, n_update, generator)]
        return torch.cat([kept, grown])

    def _kept_after_drop(self, n_update: int, tie_break: TieBreak) -> Tensor:
        """Sorted flat indices of the active weights left after dropping the ``n_update``
        of smallest magnitude."""
        active = self.layer.active_indices()
        keep = torch.ones(active.numel(), dtype=torch.bool, device=active.device)
        keep[topk_indices(-self.magnitude(), n_update, tie_break)] = False
        return active[keep]

    @torch.no_grad()
    def set_topology(
        self, new_flat: Tensor, optimizer: torch.optim.Optimizer | None
    ) -> RewireStats:
        """Install the active set ``new_flat``: positions that stay keep value and optimizer
        state; new ones start at zero with zero state."""
        old_flat = self.layer.active_indices()
        slot = torch.searchsorted(old_flat, new_flat).clamp_(max=max(old_flat.numel() - 1, 0))
        survived = old_flat.numel() > 0 and old_flat[slot] == new_flat
        survived = (
            survived
            if isinstance(survived, Tensor)
            else torch.zeros_like(new_flat, dtype=torch.bool)
        )
        values = self.param.detach()
        new_values = torch.where(survived, values[slot], torch.zeros((), dtype=values.dtype))
        states = _weight_states(optimizer, self.param)
        new_states = [
            torch.where(survived, s[slot], torch.zeros((), dtype=s.dtype)) for s in states
        ]
        order = self.layer.set_topology(new_flat, new_values)
        for state, new in zip(states, new_states, strict=True):
            state.copy_(new[order])
        n_grown = int((~survived).count_nonzero())
        return RewireStats(self.name, self.n_active, n_grown, n_grown)

    # -- checkpoints -------------------------------------------------------------------
    def topology_state(self) -> Tensor:
        """What a checkpoint stores: the sorted flat indices of the active weights (int64)."""
        return self.layer.active_indices().detach().cpu().clone()

    def load_topology(self, state: Tensor) -> None:
        """Accept indices (from this backend) or a bool mask (from the masked backend)."""
        if state.dtype == torch.bool:
            if tuple(state.shape) != self.shape:
                raise ConfigError(
                    f"state dict mask {self.name} has shape {tuple(state.shape)}, "
                    f"the model's weight has {self.shape}: it belongs to a different model"
                )
            state = state.reshape(-1).nonzero().squeeze(1)
        if state.numel() and int(state.max()) >= self.numel:
            raise ConfigError(f"state dict indices of {self.name} exceed its shape {self.shape}")
        if state.numel() != self.n_active:
            self.layer.set_topology(state, torch.zeros(state.numel(), dtype=self.param.dtype))
        else:
            self.layer.set_topology(state, self.param.detach().clone())


def _weight_states(optimizer: torch.optim.Optimizer | None, param: Tensor) -> list[Tensor]:
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, Tensor) and v.shape == param.shape]


def _blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _block_scores(grow: RowScores, r0: int, r1: int, cols: int, kept: Tensor, name: str) -> Tensor:
    """Scores of rows [r0, r1), flat, with kept positions at -inf."""
    score = grow(r0, r1).reshape(-1).clone()
    check_finite(score, name)
    lo, hi = torch.searchsorted(
        kept, torch.tensor([r0 * cols, r1 * cols], device=kept.device)
    ).tolist()
    score[kept[lo:hi] - r0 * cols] = -torch.inf
    return score


def _blockwise_topk(
    grow: RowScores, rows: int, cols: int, kept: Tensor, k: int, tie_break: TieBreak, name: str
) -> Tensor:
    """Flat positions of the ``k`` largest grow scores outside ``kept``, ties by priority.

    Pass 1 keeps a running top-k and remembers every value at which it discarded an entry
    equal to the cut (``lost``). If the final k-th value ``v`` is not among them, every
    entry equal to ``v`` was kept and the ties are resolved from the kept set; otherwise
    a counting pass and a drawing pass visit the tied entries in flat order.
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=kept.device)
    blocks = _blocks(rows, cols)
    best_val = torch.empty(0, device=kept.device)
    best_pos = torch.empty(0, dtype=torch.int64, device=kept.device)
    lost: list[float] = []
    for r0, r1 in blocks:
        score = _block_scores(grow, r0, r1, cols, kept, name)
        local = None
        if best_val.numel() == k:
            # Below the running k-th value nothing can be chosen (it only rises) nor tie
            # with the final one: one comparison pass instead of a top-k over the block.
            local = (score >= best_val.min()).nonzero().squeeze(1)
            score = score[local]
            if score.numel() == 0:
                continue
        top = torch.topk(score, min(k, score.numel()), sorted=False)
        cut = top.values.min()
        if int((score >= cut).count_nonzero()) > top.values.numel():
            lost.append(float(cut))  # an entry equal to ``cut`` was left out
        best_val = torch.cat([best_val, top.values])
        chosen = top.indices if local is None else local[top.indices]
        best_pos = torch.cat([best_pos, chosen + r0 * cols])
        if best_val.numel() > k:
            order = torch.topk(best_val, k, sorted=False).indices
            left_out = torch.ones(best_val.numel(), dtype=torch.bool, device=best_val.device)
            left_out[order] = False
            lost.append(float(best_val[left_out].max()))
            best_val, best_pos = best_val[order], best_pos[order]
    threshold = best_val.min()
    above = best_pos[best_val > threshold]
    need = k - above.numel()
    if float(threshold) not in lost:
        tied = torch.sort(best_pos[best_val == threshold]).values
        if tied.numel() > need:  # the same draws as the masked backend, in flat order
            tied = tied[torch.topk(_priority(tie_break, tied), need).indices]
        return torch.cat([above, tied])
    return torch.cat(
        [above, _tied_by_priority(grow, blocks, cols, kept, threshold, need, tie_break, name)]
    )


def _tied_by_priority(
    grow: RowScores,
    blocks: list[tuple[int, int]],
    cols: int,
    kept: Tensor,
    threshold: Tensor,
    need: int,
    tie_break: TieBreak,
    name: str,
) -> Tensor:
    """``need`` of the entries equal to ``threshold``: all of them if exactly ``need``
    exist, else the best by priority, drawn per block in flat order (bounded memory)."""
    n_tied = sum(
        int((_block_scores(grow, r0, r1, cols, kept, name) == threshold).count_nonzero())
        for r0, r1 in blocks
    )
    best_pos = torch.empty(0, dtype=torch.int64, device=kept.device)
    best_pri = torch.empty(0, device=kept.device)
    for r0, r1 in blocks:
        local = (_block_scores(grow, r0, r1, cols, kept, name) == threshold).nonzero().squeeze(1)
        best_pos = torch.cat([best_pos, local + r0 * cols])
        if n_tied == need:
            continue
        best_pri = torch.cat([best_pri, _priority(tie_break, local)])
        if best_pos.numel() > need:
            order = torch.topk(best_pri, need).indices
            best_pos, best_pri = best_pos[order], best_pri[order]
    return best_pos
