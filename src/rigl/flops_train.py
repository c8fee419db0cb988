"""Training FLOPs of the sparse-training methods relative to dense training.

REFERENCE section 4 / the RigL paper's appendix: a dense step costs ``3 f_D`` (forward,
gradient w.r.t. activations, gradient w.r.t. weights) with ``f_D`` the dense forward
FLOPs; the methods differ in which of the three products are sparse. Ratios are relative
to dense training of the same length, times the length multiplier of extended runs.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "PRUNING_BEGIN",
    "PRUNING_END",
    "PRUNING_INTERVAL",
    "pruning_flops_fraction",
    "train_flops_ratio",
]


def __getattr__(name: str) -> Any:
    if name == "TRAIN_METHODS":  # kept for callers: the registry's names
        from rigl.registry import list_methods

        return tuple(list_methods())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Gradual magnitude pruning on ImageNet in the official code / FLOPs colab: 32,000 steps,
# dense until step 10,000, cubic ramp until 25,000, masks updated every 1,000 steps;
# the cost is averaged over the 33 points 0, 1000, ..., 32000.
PRUNING_BEGIN = 10_000 / 32_000
PRUNING_END = 25_000 / 32_000
PRUNING_INTERVAL = 1_000 / 32_000


def pruning_flops_fraction(
    begin: float = PRUNING_BEGIN, end: float = PRUNING_END, interval: float = PRUNING_INTERVAL
) -> float:
    """Mean fraction ``r`` of the final sparsity reached over a cubic pruning run.

    Zhu & Gupta's schedule takes every layer's sparsity to ``r(t) * s_final`` with
    ``r(t) = 1 - (1 - (t - begin) / (end - begin))^3`` (0 before ``begin``, 1 after
    ``end``). A layer's cost is linear in its density, so the forward cost at ``t`` is
    ``f_D - r(t) (f_D - f_S)``, and the run's mean cost is ``f_D - mean(r) (f_D - f_S)``.
    ``t`` is a fraction of training, sampled every ``interval`` from 0 to 1 inclusive.
    """
    if not 0.0 <= begin < end <= 1.0:
        raise ValueError(f"pruning begin={begin!r}, end={end!r}: need 0 <= begin < end <= 1")
    if not 0.0 < interval <= 1.0:
        raise ValueError(f"pruning interval={interval!r} must be in (0, 1]")
    n = round(1.0 / interval)
    total = 0.0
    for i in range(n + 1):
        t = i / n
        if t >= begin:
            total += 1.0 - (1.0 - min(1.0, (t - begin) / (end - begin))) ** 3
    return total / (n + 1)


def pruning_window_facts(schedule: Any, total_steps: int | None) -> dict[str, float]:
    """A cubic pruning schedule's window as the facts :func:`pruning_flops_fraction` reads
    (``pruning_begin``, ``pruning_end``, ``pruning_interval``: fractions of
    ``total_steps``); empty when the run's length is unknown."""
    if total_steps is None:
        return {}
    begin, end = schedule.begin_step, schedule.end_step
    return {
        "pruning_begin": begin / total_steps,
        "pruning_end": min(1.0, max(end, begin + 1) / total_steps),
        "pruning_interval": schedule.update_interval / total_steps,
    }


def train_flops_ratio(
    method: str,
    f_sparse: float,
    f_dense: float,
    *,
    update_interval: int = 100,
    multiplier: float = 1.0,
    pruning_begin: float = PRUNING_BEGIN,
    pruning_end: float = PRUNING_END,
    pruning_interval: float = PRUNING_INTERVAL,
    **facts: float,
) -> float:
    """Training FLOPs of ``method`` as a multiple of dense training (REFERENCE section 4).

    With ``f_S`` = ``f_sparse`` and ``f_D`` = ``f_dense`` the forward FLOPs, a dense step
    costs ``3 f_D``; each method states the cost of its own step in its
    ``train_step_flops`` (see the docstrings of the classes in :mod:`rigl.methods`), e.g.
    ``3 f_S`` for static sparse training, ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` for RigL,
    ΔT = ``update_interval``. ``method`` may be a registered name or alias ("pruning" is
    gradual magnitude pruning). ``pruning_begin``/``_end``/``_interval`` (fractions of the
    run, see :func:`pruning_flops_fraction`) and ``facts`` are schedule facts handed to the
    method, which reads those it needs.

    The result is multiplied by ``multiplier`` (2 for "2x", 5 for "5x" runs; the schedule
    stretches with the run, so the per-step average is unchanged).
    """
    from rigl.registry import find_method, list_aliases, list_methods

    cls = find_method(method)
    if cls is None:
        valid = ", ".join([*list_methods(), *list_aliases()])
        raise ValueError(f"unknown method {method!r}; valid: {valid}")
    if not f_dense > 0 or not f_sparse >= 0:
        raise ValueError(f"need f_dense > 0 and f_sparse >= 0, got {f_dense!r}, {f_sparse!r}")
    if update_interval < 1:
        raise ValueError(f"update_interval={update_interval!r} must be >= 1")
    if not multiplier > 0:
        raise ValueError(f"multiplier={multiplier!r} must be > 0")
    facts = {"pruning_begin": pruning_begin, "pruning_end": pruning_end,
             "pruning_interval": pruning_interval, **facts}  # fmt: skip
    step = cls.train_step_flops(f_sparse, f_dense, update_interval=update_interval, **facts)
    return step / (3 * f_dense) * multiplier
