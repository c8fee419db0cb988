"""Drop and grow on flat masks: pure tensor functions, no module, no optimizer.

Ties are broken by a ``priority`` tensor (random, drawn from a seeded generator):
among equal scores the position with the larger priority wins. The choice is then a
function of (scores, priority) only, identical on every data-parallel worker.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_mask(score: Tensor, k: int, priority: Tensor, eligible: Tensor | None = None) -> Tensor:
    """Bool mask of the ``k`` largest ``score`` entries among ``eligible`` (1-D tensors).

    Exact ties at the k-th value are resolved by ``priority``. Cost: one ``topk`` plus
    one pass, instead of a full sort.
    """
    n = score.numel()
    chosen = torch.zeros(n, dtype=torch.bool, device=score.device)
    if k <= 0:
        return chosen
    if eligible is not None:
        n_eligible = int(eligible.sum())
        if k > n_eligible:
            raise ValueError(f"cannot choose {k} of {n_eligible} eligible positions")
        score = torch.where(eligible, score, torch.full_like(score, -torch.inf))
    elif k > n:
        raise ValueError(f"cannot choose {k} of {n} positions")
    threshold = torch.topk(score, k, sorted=False).values.min()
    above = score > threshold
    if eligible is not None:
        above &= eligible
    n_above = int(above.sum())
    chosen |= above
    tied = score == threshold
    if eligible is not None:
        tied &= eligible
    tied_idx = tied.nonzero().squeeze(1)
    need = k - n_above
    if need == tied_idx.numel():
        chosen[tied_idx] = True
    else:
        best = torch.topk(priority[tied_idx], need).indices
        chosen[tied_idx[best]] = True
    return chosen


def drop_and_grow(
    mask: Tensor, drop_score: Tensor, grow_score: Tensor, n_update: int, priority: Tensor
) -> Tensor:
    """One RigL/SET connectivity update of a flat bool ``mask``.

    Keep the ``n_active - n_update`` active positions with the largest ``drop_score``
    (dropping the ``n_update`` smallest), then grow the ``n_update`` positions with the
    largest ``grow_score`` among every position that was not kept. The just-dropped
    positions are candidates too (RigL's ``ArgTopK_{i ∉ θ \\ I_drop}``): a weight dropped
    and regrown in the same update stays active. Drop and grow sets are therefore
    disjoint from the kept set, and the active count is exactly unchanged.
    """
    n_active = int(mask.sum())
    n_update = min(int(n_update), n_active)
    keep = topk_mask(drop_score, n_active - n_update, priority, eligible=mask)
    grow = topk_mask(grow_score, n_update, priority, eligible=~keep)
    return keep | grow


def magnitude_prune(mask: Tensor, score: Tensor, n_keep: int, priority: Tensor) -> Tensor:
    """Keep the ``n_keep`` active positions of largest ``score`` (pruning never grows)."""
    return topk_mask(score, min(n_keep, int(mask.sum())), priority, eligible=mask)


def random_mask(numel: int, n_active: int, generator: torch.Generator) -> Tensor:
    """Flat bool mask with exactly ``n_active`` True positions, uniformly at random."""
    chosen = torch.zeros(numel, dtype=torch.bool)
    chosen[torch.randperm(numel, generator=generator)[:n_active]] = True
    return chosen


def update_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """A generator that depends only on (seed, step, layer): no hidden RNG state to save,
    and the same draws on every worker and after a resume."""
    mixed = (seed * 0x9E3779B1 + step * 0x85EBCA77 + layer * 0xC2B2AE3D + 0x27D4EB2F) % (2**63)
    return torch.Generator().manual_seed(mixed)
