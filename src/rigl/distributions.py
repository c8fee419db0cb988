"""Per-layer density from one global sparsity: uniform, Erdos-Renyi and Erdos-Renyi-Kernel.

Pure functions over weight shapes; nothing here touches a module. Every layer gets an
exact integer number of active weights, ``n_active = numel - floor(sparsity * numel)``,
as in RigL (Evci et al., 2020, section 3 and appendix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rigl.config import ConfigError, check_sparsity

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
    exact = sparsity * numel
    nearest = round(exact)
    if abs(exact - nearest) < 1e-6 * max(1.0, exact):
        return int(nearest)
    return math.floor(exact)


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
    weights must equal the uniform budget over the scaled layers:
    ``sum_l eps * p_l * N_l = (1 - S) * sum_l N_l``, so
    ``eps = (1 - S) * sum N_l / sum p_l N_l``. When some ``eps * p_l > 1`` the layers
    tied at the largest score are made dense (density 1), their surplus
    ``S * N_l`` is taken from the budget of the others, and ``eps`` is solved again
    until no layer exceeds density 1 (skipping this undershoots the requested density).
    """
    check_sparsity(sparsity)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"distribution={distribution!r} is unknown; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    if not erk_power >= 0:
        raise ConfigError(f"erk_power={erk_power!r} must be >= 0 (1 = ERK, 0 = uniform)")
    custom = dict(custom or {})
    for index, value in custom.items():
        check_sparsity(value, name=f"custom sparsity of layer {index}")
    out = [float(custom.get(i, sparsity)) for i in range(len(shapes))]
    scaled = [i for i in range(len(shapes)) if i not in custom]
    if distribution == "uniform" or not scaled or sparsity == 0.0:
        return out

    numel = [math.prod(int(d) for d in s) for s in shapes]
    scores = {i: _raw_score(shapes[i], distribution, erk_power) for i in scaled}
    dense: set[int] = set()
    while True:
        budget = 0.0  # active weights left for the layers that are still scaled
        divisor = 0.0
        for i in scaled:
            if i in dense:
                budget -= sparsity * numel[i]
            else:
                budget += (1.0 - sparsity) * numel[i]
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
    """Exact number of active weights per layer: ``numel - floor(s_l * numel)``."""
    sparsities = layer_sparsities(
        shapes, sparsity, distribution, erk_power=erk_power, custom=custom
    )
    counts = []
    for shape, s in zip(shapes, sparsities, strict=True):
        numel = math.prod(int(d) for d in shape)
        counts.append(numel - n_zeros_for(min(max(s, 0.0), 1.0), numel))
    return counts
