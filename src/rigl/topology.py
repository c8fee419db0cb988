"""Top-k and random draws on flat positions: pure tensor functions, no module, no optimizer.

The drop and grow built on them are :mod:`rigl.selection`.

Ties are broken by priority: among equal scores the position with the larger priority
wins. Priorities come from a tensor (golden tests) or are drawn, only for the tied
entries, from a generator seeded by (seed, step, layer); the choice is then a function
of the scores and the seed only, identical on every data-parallel worker.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

TieBreak = Tensor | torch.Generator


def _priority(tie_break: TieBreak, index: Tensor, low_wins: bool = False) -> Tensor:
    """Priorities of the entries ``index``: looked up in a tensor, or drawn for just those
    entries (in index order) from a seeded generator, so no O(N) draw is needed. With
    ``low_wins`` negated (the same draws), so the smaller priority wins."""
    if isinstance(tie_break, Tensor):
        priority = tie_break[index]
    else:
        priority = torch.rand(index.numel(), generator=tie_break).to(index.device)
    return -priority if low_wins else priority


def _subset(tie_break: TieBreak, index: Tensor) -> TieBreak:
    return tie_break[index] if isinstance(tie_break, Tensor) else tie_break


def topk_indices(score: Tensor, k: int, tie_break: TieBreak, *, low_wins: bool = False) -> Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``score``, in no particular order.

    Exact ties at the k-th value are resolved by priority (larger wins; smaller with
    ``low_wins``, which :func:`bottomk_keep` uses to choose the exact complement of a
    bottom-k). Cost: a few comparison passes and a top-k over the entries near the k-th
    value (:func:`_band`); priorities are drawn only when there is a tie.
    """
    band = _band_if_large(score, k, tie_break, low_wins)
    if band is not None:
        return torch.cat([band[0].nonzero().squeeze(1), band[1]])
    return _checked_topk(score, k, tie_break, low_wins)


def topk_mask(score: Tensor, k: int, tie_break: TieBreak, *, low_wins: bool = False) -> Tensor:
    """Bool mask of :func:`topk_indices` (the same entries, the same tie draws), built
    without the list of chosen indices where the band applies."""
    band = _band_if_large(score, k, tie_break, low_wins)
    if band is not None:
        above, share = band
        above[share] = True
        return above
    chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    chosen[_checked_topk(score, k, tie_break, low_wins)] = True
    return chosen


def _checked_topk(score: Tensor, k: int, tie_break: TieBreak, low_wins: bool) -> Tensor:
    """:func:`_exact_topk` for any ``k``: none for ``k <= 0``, a ValueError above the size."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    if k > score.numel():
        raise ValueError(f"cannot choose {k} of {score.numel()} positions")
    return _exact_topk(score, k, tie_break, low_wins)


def _exact_topk(score: Tensor, k: int, tie_break: TieBreak, low_wins: bool = False) -> Tensor:
    values, index = torch.topk(score, k, sorted=False)
    threshold = values.min()
    if int((score >= threshold).count_nonzero()) == k:
        return index
    above = (score > threshold).nonzero().squeeze(1)
    tied = (score == threshold).nonzero().squeeze(1)
    best = torch.topk(_priority(tie_break, tied, low_wins), k - above.numel()).indices
    return torch.cat([above, tied[best]])


# A full top-k over N entries costs O(N log k) and, for k near N / 10 of millions of
# entries, far more than a few comparison passes. A random sample of the scores brackets
# the k-th largest value between two thresholds lo <= hi; the entries above hi are in the
# top k for sure, and the rest are chosen by a top-k over the narrow band [lo, hi]. It
# stays exact: when count(> hi) <= k <= count(>= lo), the k-th largest value lies in the
# band, and so does every entry tied with it, in flat order as in the plain top-k (the
# same tie draws). When the sample misses, the plain top-k runs.
_PREFILTER_MIN = 65_536
_SAMPLE = 8_192
_BAND_SIGMAS = 5  # half-width of the band: sampling standard deviations of the rank


def sample_positions(n: int, device: torch.device | str = "cpu") -> Tensor:
    """``min(n, 8192)`` sorted positions in [0, n) for estimating a quantile of ``n``
    scores, drawn from a fixed-seed generator (so reproducible and independent of every
    tie-break stream). Not strided: a stride that shares a factor with the row length
    samples a few columns only, and the grow scores of a layer vary by column."""
    return _sample_positions(n).to(device)


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int) -> Tensor:  # cached: the same n recurs at every update
    if n <= _SAMPLE:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(n)
    return torch.sort(torch.randint(0, n, (_SAMPLE,), generator=generator)).values


def _band(
    score: Tensor, k: int, tie_break: TieBreak, low_wins: bool
) -> tuple[Tensor, Tensor] | None:
    """The top k through a sampled band around the k-th largest value: ``(above, chosen)``,
    a bool mask of the entries above the band (all in the top k) and the indices of the
    band's share, or None if the sample missed (or a mass of ties makes the band as large
    as the input). No tie is drawn before it is known not to be None."""
    n = score.numel()
    sample = score[sample_positions(n, score.device)].sort().values
    size = sample.numel()
    rank = size - k * size / n  # expected sample rank (0-based, ascending) of the k-th largest
    q = k / n
    margin = _BAND_SIGMAS * (size * q * (1 - q)) ** 0.5 + 8
    lo = sample[max(0, int(rank - margin))]
    hi = sample[min(size - 1, int(rank + margin))]
    above = score > hi
    n_above = int(above.count_nonzero())
    if n_above > k:
        return None
    band = ((score >= lo) & (score <= hi)).nonzero().squeeze(1)
    if n_above + band.numel() < k or band.numel() > n // 2:
        return None
    rest = k - n_above
    if rest == 0:
        return above, band[:0]
    return above, band[_exact_topk(score[band], rest, _subset(tie_break, band), low_wins)]


def _band_if_large(
    score: Tensor, k: int, tie_break: TieBreak, low_wins: bool
) -> tuple[Tensor, Tensor] | None:
    """:func:`_band` where it saves work (a large score, 0 < k < size), else None."""
    if score.numel() < _PREFILTER_MIN or not 0 < k < score.numel():
        return None
    return _band(score, k, tie_break, low_wins)


def bottomk_keep(score: Tensor, k: int, tie_break: TieBreak) -> Tensor:
    """Bool over ``score``: False at its ``k`` smallest entries (ties: the larger priority
    is dropped), i.e. the complement of ``topk_indices(-score, k, tie_break)``, computed
    from whichever side is smaller: keeping the ``n - k`` largest with the smaller
    priority winning among ties picks exactly that complement, with the same tie draws."""
    n = score.numel()
    if 2 * k <= n:
        return ~topk_mask(-score, k, tie_break)
    return topk_mask(score, n - k, tie_break, low_wins=True)


def split_evenly(n: int, parts: int) -> list[int]:
    """``n`` split into ``parts`` counts that differ by at most one, larger ones first."""
    return [n // parts + (1 if b < n % parts else 0) for b in range(parts)]


def random_mask(numel: int, n_active: int, generator: torch.Generator) -> Tensor:
    """Flat bool mask with exactly ``n_active`` True positions, uniformly at random."""
    chosen = torch.zeros(numel, dtype=torch.bool)
    chosen[random_indices(numel, n_active, generator)] = True
    return chosen


# A permutation of all positions costs 8 bytes per position (34 GB for a 65536 x 65536
# layer). Up to PERMUTATION_MAX positions it is still used, so that every mask drawn
# before the O(n_active) sampler existed stays the same; above, the positions are drawn
# as the first ``n_active`` distinct values of a stream of uniform draws, which is a
# uniformly random ``n_active``-subset (each new distinct value is uniform over the
# positions not drawn yet). Expected repeats: n_active^2 / (2 numel), so one or two rounds.
PERMUTATION_MAX = 1 << 24


def random_indices(numel: int, n_active: int, generator: torch.Generator | None) -> Tensor:
    """Exactly ``n_active`` distinct flat positions in ``[0, numel)``, uniformly at random
    (int64, in no particular order). Memory O(n_active) above :data:`PERMUTATION_MAX`."""
    if not 0 <= n_active <= numel:
        raise ValueError(f"cannot choose {n_active} of {numel} positions")
    if n_active == 0:  # e.g. an empty layer about to get its indices: no O(numel) draw
        return torch.zeros(0, dtype=torch.int64)
    if numel <= PERMUTATION_MAX:
        return torch.randperm(numel, generator=generator)[:n_active]
    if 2 * n_active > numel:  # dense: draw the positions left out (O(numel) bools <= 2 n_active)
        chosen = torch.ones(numel, dtype=torch.bool)
        chosen[_distinct_draws(numel, numel - n_active, generator)] = False
        return chosen.nonzero().squeeze(1)
    return _distinct_draws(numel, n_active, generator)


def random_indices_outside(
    numel: int, n: int, excluded: Tensor, generator: torch.Generator | None
) -> Tensor:
    """``n`` distinct flat positions of ``[0, numel)`` not in ``excluded`` (sorted int64),
    uniformly at random, sorted. O(n + len(excluded)) memory; meant for sparse
    ``excluded`` (e.g. a layer's active weights).

    The distinct free positions hit by a stream of uniform draws are, given their number
    ``m``, a uniform ``m``-subset of the free positions; drawing until ``m >= n`` and
    leaving out ``m - n`` of them at random gives a uniform ``n``-subset (one sort per
    round, no stable sort)."""
    free = numel - excluded.numel()
    if not 0 <= n <= free:
        raise ValueError(f"cannot choose {n} of the {free} free positions")
    if 2 * n > free:  # most free positions: list them (O(numel) <= O(4 n)) and leave some out
        is_free = torch.ones(numel, dtype=torch.bool)
        is_free[excluded] = False
        pool = is_free.nonzero().squeeze(1)
    else:  # a few: rejection sampling, never more than about 2 n positions at once
        pool = _free_draws(numel, n, excluded, generator)
    keep = torch.ones(pool.numel(), dtype=torch.bool)
    keep[_distinct_draws(pool.numel(), pool.numel() - n, generator)] = False
    return pool[keep]


def random_subsets(rows: int, n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``(rows, k)``: in every row, ``k`` distinct values of ``[0, n)``, uniformly at random
    and independently of the other rows, sorted. O(rows k) memory when ``2 k <= n``.

    Each row draws ``2 k + 4`` uniform values; its distinct ones are, given their number
    ``m >= k``, a uniform ``m``-subset, and ``k`` of them chosen by random keys a uniform
    ``k``-subset; a row with fewer than ``k`` distinct values draws again (rare: at
    ``k = n / 2`` about ``0.63 (2 k)`` of the draws are distinct)."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} values per row")
    if k == n:
        return torch.arange(n).expand(rows, n).clone()
    if 2 * k > n:  # most values: key every value (O(rows n) <= O(2 rows k))
        keys = torch.rand(rows, n, generator=generator)
        return torch.sort(torch.topk(keys, k, dim=1).indices, dim=1).values
    out = torch.empty(rows, k, dtype=torch.int64)
    todo = torch.arange(rows)
    draws_per_row = 2 * k + 4
    while todo.numel():
        values = torch.randint(n, (todo.numel(), draws_per_row), generator=generator)
        ordered = torch.sort(values, dim=1).values
        distinct = torch.ones_like(ordered, dtype=torch.bool)
        distinct[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        keys = torch.rand(ordered.shape, generator=generator).masked_fill_(~distinct, -1.0)
        picked = ordered.gather(1, torch.topk(keys, k, dim=1).indices)
        done = distinct.sum(1) >= k
        out[todo[done]] = torch.sort(picked[done], dim=1).values
        todo = todo[~done]
    return out


def _free_draws(numel: int, n: int, excluded: Tensor, generator: torch.Generator | None) -> Tensor:
    """At least ``n`` distinct positions not in ``excluded``, hit by uniform draws (sorted)."""
    free = numel - excluded.numel()
    pool = torch.zeros(0, dtype=torch.int64)
    while pool.numel() < n:
        missing = n - pool.numel()
        size = missing * numel // max(free, 1) + missing * n // max(free, 1) + missing // 64 + 16
        draws = torch.randint(numel, (size,), generator=generator)
        pool = torch.unique(torch.cat([pool, draws]))
        if excluded.numel():
            slot = torch.searchsorted(excluded, pool).clamp_(max=excluded.numel() - 1)
            pool = pool[excluded[slot] != pool]
    return pool


def _distinct_draws(numel: int, n: int, generator: torch.Generator | None) -> Tensor:
    """The first ``n`` distinct values of a stream of uniform draws from ``[0, numel)``."""
    chosen = torch.zeros(0, dtype=torch.int64)
    while chosen.numel() < n:
        missing = n - chosen.numel()
        draws = torch.randint(numel, (missing + missing * n // numel + 16,), generator=generator)
        chosen = _first_occurrences(torch.cat([chosen, draws]))
    return chosen[:n]


def _first_occurrences(values: Tensor) -> Tensor:
    """``values`` without repeats: each value kept at its first position, order unchanged."""
    ordered, order = torch.sort(values, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return values[torch.sort(order[first]).values]


def update_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """A generator that depends only on (seed, step, layer): no hidden RNG state to save,
    and the same draws on every worker and after a resume."""
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + layer * 0xC2B2AE3D + 0x27D4EB2F) % (2**63)
    return torch.Generator().manual_seed(mixed)
