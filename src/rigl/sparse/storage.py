"""Compressed sparse storage behind the same seam as :class:`rigl.storage.MaskedWeight`.

A :class:`SparseWeight` wraps a :class:`~rigl.sparse.SparseLinear`: only the active values
exist, so drop works on them directly, and growth scans the grow scores block by block of
output rows, holding only the entries at or above a running cut. No dense score, mask or
gradient matrix is built.

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
import torch.distributed as dist
from torch import Tensor

from rigl.config import ConfigError
from rigl.optim_state import weight_states
from rigl.sparse import kernels
from rigl.sparse.index import _sort
from rigl.sparse.linear import SparseLinear
from rigl.storage import RewireStats, RowScores, check_finite
from rigl.topology import (
    TieBreak,
    _priority,
    random_indices_outside,
    sample_positions,
    topk_indices,
)

# Grow scores per block (16 MB of float32): for a wide layer (65536 inputs) that is 64
# rows, enough for the gradient GEMM of a block to run near full speed.
BLOCK_ELEMENTS = 1 << 22


class SparseWeight:
    """The weight of a :class:`SparseLinear` (or ``SparseConv2d``/``1d``: its kernel viewed as
    the matrix ``(out, in*kh*kw)``), seen by the algorithms."""

    blocks = 1  # a packed q/k/v projection is never compressed

    def __init__(self, name: str, layer: SparseLinear) -> None:
        self.name = name
        self.layer = layer
        self._active: tuple[object, Tensor] | None = None  # (index, its flat positions)
        self._plan: tuple[Tensor, Tensor] | None = None  # (planned flat indices, drop mask)

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
    def magnitude(self) -> Tensor:
        """``|θ|`` of the active weights, in flat-index order."""
        return self.param.detach().abs()

    def gradient_rows(self, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) of the dense gradient ``dy^T x``, accumulated over the update step's
        backward calls (averaged over the data-parallel ranks, like DDP's ``.grad``)."""
        return _mean_over_ranks(self.layer.grad_rows(r0, r1))

    def gradient_at(self, flat: Tensor) -> Tensor:
        """The dense gradient at the flat positions ``flat`` only (an SDDMM; averaged over
        the data-parallel ranks)."""
        return _mean_over_ranks(self.layer.grad_at(flat))

    # -- topology ----------------------------------------------------------------------
    def rewire(self, n_update: int, grow: RowScores, tie_break: TieBreak) -> Tensor:
        """New active flat indices: drop the ``n_update`` smallest, grow the best ``grow``."""
        n_update = min(int(n_update), self.n_active)
        kept, keep = self._kept_after_drop(n_update, tie_break)
        grown = _blockwise_topk(grow, self.rows, self.cols, kept, n_update, tie_break, self.name)
        return self._planned(kept, keep, grown)

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
        kept, keep = self._kept_after_drop(n_update, generator)
        free = self.numel - kept.numel()
        candidates = random_indices_outside(
            self.numel, min(max(n_candidates, n_update), free), kept.cpu(), generator
        ).to(kept.device)
        score = scores_at(candidates)
        check_finite(score, self.name)
        grown = candidates[topk_indices(score, n_update, generator)]
        return self._planned(kept, keep, grown)

    def _kept_after_drop(self, n_update: int, tie_break: TieBreak) -> tuple[Tensor, Tensor]:
        """Sorted flat indices of the active weights left after dropping the ``n_update``
        of smallest magnitude, and the drop mask over the active weights (True: kept)."""
        active = self._active_indices()
        keep = torch.ones(active.numel(), dtype=torch.bool, device=active.device)
        keep[topk_indices(-self.magnitude(), n_update, tie_break)] = False
        return active[keep], keep

    def _active_indices(self) -> Tensor:
        """The layer's active flat positions, computed once per index (drop and install
        both need them in an update)."""
        index = self.layer._index
        if self._active is None or self._active[0] is not index:
            self._active = (index, self.layer.active_indices())
        return self._active[1]

    def _planned(self, kept: Tensor, keep: Tensor, grown: Tensor) -> Tensor:
        """``kept`` then ``grown``, remembered with the drop mask: :meth:`set_topology` then
        merges the two sorted runs and knows the old slot of every kept weight."""
        new_flat = torch.cat([kept, grown])
        self._plan = (new_flat, keep)
        return new_flat

    @torch.no_grad()
    def set_topology(
        self,
        new_flat: Tensor,
        optimizer: torch.optim.Optimizer | None,
        grown_gradient: bool = False,
    ) -> RewireStats:
        """Install the active set ``new_flat``: positions that stay keep value, optimizer
        state and gradient; new ones start at zero with fresh state (what the optimizer
        starts it at) and, if ``grown_gradient``, the dense gradient there, else zero (as
        on the masked backend)."""
        old_flat = self._active_indices()
        plan, self._plan, self._active = self._plan, None, None
        if plan is not None and plan[0] is new_flat and plan[1].numel() == old_flat.numel():
            n_kept = int(plan[1].count_nonzero())
            grown = new_flat[n_kept:]
            merged, slot = _merge_plan(old_flat, plan[1], grown, self.numel, self.layer.kernels)
        else:
            merged = _sort(new_flat.reshape(-1).to(torch.int64), self.numel)[0]
            slot = _old_slots(old_flat, merged)
        survived = slot >= 0
        slot = slot.clamp(min=0)
        values = self.param.detach()
        new_values = torch.where(survived, values[slot], torch.zeros((), dtype=values.dtype))
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
        where = f"state dict masks[{self.name!r}]"
        if state.dtype == torch.bool:
            if tuple(state.shape) not in (self.shape, self.layer.weight_shape):
                raise ConfigError(
                    f"{where} has shape {tuple(state.shape)}, the model's weight has "
                    f"{self.layer.weight_shape}: it belongs to a different model"
                )
            return state.reshape(-1).nonzero().squeeze(1)
        if state.dtype not in (torch.int32, torch.int64) or state.dim() != 1:
            raise ConfigError(
                f"{where} has dtype {state.dtype} and shape {tuple(state.shape)}; expected "
                "1-D int64 flat indices (or a bool mask)"
            )
        flat = torch.sort(state.to(torch.int64)).values
        if flat.numel() and (int(flat[0]) < 0 or int(flat[-1]) >= self.numel):
            bad = int(flat[0]) if int(flat[0]) < 0 else int(flat[-1])
            raise ConfigError(
                f"{where} holds index {bad}, outside [0, {self.numel}) of shape {self.shape}"
            )
        if bool((flat[1:] == flat[:-1]).any()):
            raise ConfigError(f"{where} holds a duplicate index")
        return flat

    def load_topology(self, state: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Install a checkpoint's topology (see :meth:`check_topology`) as an update would:
        positions that stay active keep their value and optimizer state, new ones start at
        zero, so the optimizer state follows a change of the active count (the masked
        backend's state is dense and stays in place, with the same effect)."""
        self.set_topology(self.check_topology(state).to(self.param.device), optimizer)


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


def _blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _block_hits(
    grow: RowScores, r0: int, r1: int, cols: int, kept: Tensor, name: str
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Scores of rows [r0, r1), flat; the kept positions of the block (sorted, local); and
    ``hits(cond)``: the block positions where the bool ``cond`` holds, kept positions
    excluded (the scores themselves are not written: ``grow`` may return a view of data
    it keeps)."""
    score = grow(r0, r1).reshape(-1)
    check_finite(score, name)
    lo, hi = torch.searchsorted(
        kept, torch.tensor([r0 * cols, r1 * cols], device=kept.device)
    ).tolist()
    kept_here = kept[lo:hi] - r0 * cols

    def hits(cond: Tensor) -> Tensor:
        cond[kept_here] = False
        return cond.nonzero().squeeze(1)

    return score, kept_here, hits


# Before k candidates are held there is no exact cut yet; a block is then cut at a value
# estimated from a random sample of its free (not kept) positions so that about
# ``margin`` times its share of k pass (the sampled prefilter of rigl.topology, per
# block). Skipping below a guess is exact as long as the final k-th value is not below
# it: if fewer than k pass in all, the blocks are scanned again below their cuts with a
# larger margin; if the final k-th value is below some cut, those blocks are scanned
# again from it.
_SAMPLE_MIN = 1 << 16  # smaller blocks: no guess, every entry is a candidate


def _sampled_cut(score: Tensor, kept_here: Tensor, share: float) -> float:
    """A value about ``share`` free entries of ``score`` are at or above (-inf: none)."""
    n = score.numel()
    n_free = n - kept_here.numel()
    if n < _SAMPLE_MIN or 8 * share > n_free:
        return -torch.inf  # no saving
    pos = sample_positions(n, score.device)
    if kept_here.numel():
        at = torch.searchsorted(kept_here, pos).clamp_(max=kept_here.numel() - 1)
        pos = pos[kept_here[at] != pos]
    sample = score[pos]
    rank = sample.numel() - int(share * sample.numel() / n_free) - 16
    return float(torch.kthvalue(sample, rank).values) if rank >= 1 else -torch.inf


class _Candidates:
    """Entries ``(value, flat position)`` that may be among the ``k`` largest.

    Every entry at or above its block's cut is held, except entries equal to a value in
    ``lost`` (dropped from a mass of ties, to bound memory). ``floor`` is the k-th largest
    value held at the last prune: it only rises and never passes the final k-th value, so
    it is an exact cut for the blocks that follow.
    """

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.val = torch.empty(0, device=device)
        self.pos = torch.empty(0, dtype=torch.int64, device=device)
        self.floor = -torch.inf
        self.lost: list[float] = []

    def add(
        self, score: Tensor, hits: Callable[[Tensor], Tensor], lo: float, hi: float, offset: int
    ) -> None:
        """Hold the entries with ``lo <= score < hi`` (``score > -inf`` when lo is -inf)."""
        cond = score > lo if lo == -torch.inf else score >= lo
        if hi < torch.inf:
            cond &= score < hi
        local = hits(cond)
        self.val = torch.cat([self.val, score[local]])
        self.pos = torch.cat([self.pos, local + offset])
        if self.val.numel() > 3 * self.k:  # bounded memory: back to about k
            self.prune()

    def kth(self) -> float:
        """The k-th largest value held (``floor`` if fewer than k are held)."""
        n = self.val.numel()
        return self.floor if n < self.k else float(torch.kthvalue(self.val, n - self.k + 1).values)

    def prune(self) -> None:
        """Hold only the entries >= the k-th largest value."""
        if self.val.numel() < self.k:
            return
        kth = self.kth()
        keep = self.val >= kth
        if int(keep.count_nonzero()) > 2 * self.k:  # a mass of ties at kth: drop them
            keep = self.val > kth
            self.lost.append(kth)
        self.floor = kth
        self.val, self.pos = self.val[keep], self.pos[keep]


def _blockwise_topk(
    grow: RowScores, rows: int, cols: int, kept: Tensor, k: int, tie_break: TieBreak, name: str
) -> Tensor:
    """Flat positions of the ``k`` largest grow scores outside ``kept``, ties by priority.

    One pass holds, per block, the entries at or above a cut: the running k-th value once
    k entries are held (exact), before that a sampled guess (:func:`_sampled_cut`). If
    fewer than k entries passed, the blocks are scanned again below their cuts with lower
    guesses; blocks whose cut exceeds the final k-th value ``v`` are scanned again for the
    entries in [v, cut) (both rare). Entries tied at ``v`` are then chosen by priority in flat order, as
    on the masked backend; if some were dropped (a mass of ties), a counting pass and a
    drawing pass visit them again. Per block: one GEMM, one comparison, one gather.
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=kept.device)
    blocks = _blocks(rows, cols)
    free = rows * cols - kept.numel()
    held = _Candidates(k, kept.device)
    done = [torch.inf] * len(blocks)  # block i holds every free entry >= done[i]
    margin = 1.5
    while True:
        for i, (r0, r1) in enumerate(blocks):
            if done[i] == -torch.inf:
                continue
            score, kept_here, hits = _block_hits(grow, r0, r1, cols, kept, name)
            cut = held.floor
            if cut == -torch.inf:
                share = k * (score.numel() - kept_here.numel()) / free
                cut = _sampled_cut(score, kept_here, margin * share)
            if cut < done[i]:
                held.add(score, hits, cut, done[i], r0 * cols)
                done[i] = cut
        seen_k = held.val.numel() >= k or held.floor > -torch.inf  # a prune saw k
        if seen_k or all(d == -torch.inf for d in done):
            break
        margin *= 8  # fewer than k passed the guesses: lower them
    threshold = held.kth()
    low = [(i, cut) for i, cut in enumerate(done) if cut > threshold]
    for i, cut in low:  # guessed too high: the entries in [threshold, cut) are missing
        r0, r1 = blocks[i]
        score, _, hits = _block_hits(grow, r0, r1, cols, kept, name)
        held.add(score, hits, threshold, cut, r0 * cols)
    if low:
        threshold = held.kth()
    above = held.pos[held.val > threshold]
    need = k - above.numel()
    if threshold not in held.lost:
        tied = torch.sort(held.pos[held.val == threshold]).values
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
    threshold: float,
    need: int,
    tie_break: TieBreak,
    name: str,
) -> Tensor:
    """``need`` of the entries equal to ``threshold``: all of them if exactly ``need``
    exist, else the best by priority, drawn per block in flat order (bounded memory)."""

    def tied(r0: int, r1: int) -> Tensor:
        score, _, hits = _block_hits(grow, r0, r1, cols, kept, name)
        return hits(score == threshold)

    n_tied = sum(tied(r0, r1).numel() for r0, r1 in blocks)
    best_pos = torch.empty(0, dtype=torch.int64, device=kept.device)
    best_pri = torch.empty(0, device=kept.device)
    for r0, r1 in blocks:
        local = tied(r0, r1)
        best_pos = torch.cat([best_pos, local + r0 * cols])
        if n_tied == need:
            continue
        best_pri = torch.cat([best_pri, _priority(tie_break, local)])
        if best_pos.numel() > need:
            order = torch.topk(best_pri, need).indices
            best_pos, best_pri = best_pos[order], best_pri[order]
    return best_pos
