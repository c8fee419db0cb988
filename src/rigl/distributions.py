"""Per-layer density from one global sparsity: uniform, Erdos-Renyi and Erdos-Renyi-Kernel.

Pure functions over weight shapes; nothing here touches a module. Every layer gets an
exact integer number of active weights (uniform: ``numel - floor(sparsity * numel)``, as
in RigL, Evci et al., 2020, section 3 and appendix), and the ER/ERK layers together keep
exactly the uniform budget in whole weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rigl.config import check_sparsity
from rigl.errors import ConfigError, check_real

DISTRIBUTIONS = ("uniform", "er", "erk")


def _raw_score(shape: Sequence[int], distribution: str, erk_power: float) -> float:
    """Unnormalised density score ``p_l`` of one layer.

    ER counts only the two fan dimensions: ``(n_in + n_out) / (n_in * n_out)``.
    ERK adds the kernel dimensions: ``sum(shape) / prod(shape)``, raised to ``erk_power``.
    Weights are stored PyTorch style ``(out, in, *kernel)``; a 1-D shape is treated as
    one fan of size ``shape[0]`` and another of size 1.
    """
    dims = [int(d) for d in shape] if len(shape) > 1 else [int(shape[0]), 1]
    if distribution == "er":
        n_out, n_in = dims[0], dims[1]
        return (n_in + n_out) / (n_in * n_out)
    score = sum(dims) / math.prod(dims)
    return score**erk_power


def n_zeros_for(sparsity: float, numel: int) -> int:
    """``floor(sparsity * numel)``, robust to float error such as ``0.29 * 100 = 28.99...``."""
    return _whole_floor(sparsity * numel)


def _whole_floor(value: float) -> int:
    """``floor(value)``, except that a value within float error of an integer is that integer."""
    nearest = round(value)
    if abs(value - nearest) < 1e-6 * max(1.0, abs(value)):
        return int(nearest)
    return math.floor(value)


def layer_sparsities(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    erk_power: float = 1.0,
    custom: Mapping[int, float] | None = None,
) -> list[float]:
    """Target sparsity of each layer (before rounding to integer counts).

    ``custom`` maps a layer index to a fixed sparsity (0.0 keeps it dense); such layers
    are left out of the budget, as in the official RigL code.

    ERK scaling (derivation). With densities ``d_l = eps * p_l`` the number of active
    weights must equal the uniform budget over the scaled layers, counted in whole
    weights as in the official code (``get_sparsities_erdos_renyi``) and JaxPruner:
    ``sum_l eps * p_l * N_l = sum_l (N_l - floor(S * N_l))``, so
    ``eps = sum_l (N_l - floor(S * N_l)) / sum_l p_l N_l``. When some ``eps * p_l > 1``
    the layers tied at the largest score are made dense (density 1), their surplus
    ``floor(S * N_l)`` is taken from the budget of the others, and ``eps`` is solved
    again until no layer exceeds density 1 (skipping this undershoots the requested
    density).
    """
    sparsity = check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"distribution={distribution!r} is unknown; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    erk_power = check_real(erk_power, "erk_power", low=0.0, hint=" (1 = ERK, 0 = uniform)")
    custom = dict(custom or {})
    for index, value in custom.items():
        check_sparsity(value, name=f"custom sparsity of layer {index}")
    out = [float(custom.get(i, sparsity)) for i in range(len(shapes))]
    scaled = [i for i in range(len(shapes)) if i not in custom]
    if distribution == "uniform" or not scaled or sparsity == 0.0:
        return out

    numel = [math.prod(int(d) for d in s) for s in shapes]
    zeros = {i: n_zeros_for(sparsity, numel[i]) for i in scaled}
    scores = {i: _raw_score(shapes[i], distribution, erk_power) for i in scaled}
    dense: set[int] = set()
    while True:
        budget = 0  # whole active weights left for the layers that are still scaled
        divisor = 0.0
        for i in scaled:
            if i in dense:
                budget -= zeros[i]
            else:
                budget += numel[i] - zeros[i]
                divisor += scores[i] * numel[i]
        if divisor == 0.0:  # every layer ended up dense
            break
        eps = budget / divisor
        free = [i for i in scaled if i not in dense]
        top = max(scores[i] for i in free)
        if eps * top <= 1.0:
            break
        dense.update(i for i in free if scores[i] == top)
    for i in scaled:
        out[i] = 0.0 if i in dense else 1.0 - eps * scores[i]
    return out


def active_counts(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    *,
    erk_power: float = 1.0,
    custom: Mapping[int, float] | None = None,
) -> list[int]:
    """Exact number of active weights per layer.

    Uniform and custom layers get ``numel - floor(s_l * numel)``; the layers scaled by
    ER/ERK share their whole-number uniform budget ``sum_l (numel_l - floor(S * numel_l))``
    exactly (see :func:`layer_sparsities` and :func:`_round_shares`).
    """
    sparsities = layer_sparsities(
        shapes, sparsity, distribution, erk_power=erk_power, custom=custom
    )
    numel = [math.prod(int(d) for d in s) for s in shapes]
    counts = [
        n - n_zeros_for(min(max(s, 0.0), 1.0), n) for s, n in zip(sparsities, numel, strict=True)
    ]
    scaled = [i for i in range(len(shapes)) if i not in (custom or {})]
    if distribution != "uniform" and scaled:
        budget = sum(numel[i] - n_zeros_for(sparsity, numel[i]) for i in scaled)
        shares = [min(max(1.0 - sparsities[i], 0.0), 1.0) * numel[i] for i in scaled]
        for i, count in zip(scaled, _round_shares(shares, budget), strict=True):
            counts[i] = count
    return counts


def _round_shares(shares: Sequence[float], budget: int) -> list[int]:
    """Whole counts summing to ``budget`` from real ``shares`` that sum to it (up to float
    error), each within one of its share.

    The last rounding (largest remainders): every layer first gets the floor of its share
    (a share within float error of an integer counts as that integer). The ``budget`` minus
    these floors is the sum of the fractional parts, so it is smaller than the number of
    layers that have one; those weights go one each to the layers of largest fractional
    part, a layer that would otherwise be empty first (an empty layer cuts the network),
    ties to the earlier layer. A share never exceeds its layer's size, and a layer given
    one more had a fractional part, so no layer exceeds its size.
    """
    counts = [max(_whole_floor(x), 0) for x in shares]
    left = budget - sum(counts)
    order = sorted(range(len(shares)), key=lambda i: (counts[i] > 0, counts[i] - shares[i], i))
    for i in order[: max(left, 0)]:
        counts[i] += 1
    return counts
