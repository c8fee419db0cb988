"""The grow step's top-k over row blocks of scores, in bounded memory.

:func:`blockwise_topk` chooses the ``k`` largest grow scores outside the kept positions
of a ``rows x cols`` weight whose scores are read block of rows by block of rows (a
compressed weight's dense gradient is one matrix product per block), holding only the
entries at or above a running cut: no dense score matrix ever exists.

It is the same function of (scores, seed) as one :func:`rigl.topology.topk_indices` over
all the scores, so both storages choose identical masks: the k-th largest value ``v`` is
found in a first pass; if entries tied at ``v`` must be chosen between, a second pass
visits the tied entries in flat order and draws their priorities from the same generator
(torch's CPU generator is split-consistent: ``rand(a)`` then ``rand(b)`` equals
``rand(a + b)``), keeping a running best by priority, so memory stays bounded even when
millions of scores tie at zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rigl.rewiring import RowScores, check_finite
from rigl.topology import TieBreak, _priority, sample_positions


def row_blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]``: the rows in consecutive blocks of ``block_rows`` (the last shorter)."""
    step = max(1, block_rows)
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


def blockwise_topk(
    grow: RowScores,
    rows: int,
    cols: int,
    kept: Tensor,
    k: int,
    tie_break: TieBreak,
    name: str,
    block_rows: int,
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
    blocks = row_blocks(rows, block_rows)
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
