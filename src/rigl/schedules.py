"""When to update the topology and by how much. Frozen dataclasses told the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rigl.errors import ConfigError, check_int, check_real, warn

DECAYS = ("cosine", "constant", "linear")


@dataclass(frozen=True)
class UpdateSchedule:
    """Connectivity-update schedule of dynamic sparse training (RigL section 3).

    Attributes:
        update_interval: ΔT, optimizer steps between two topology updates (paper: 100).
        end_step: T_end, no update at or after this step (paper: 75% of training).
        begin_step: first step that may update (default ΔT, so step 0 never updates).
        drop_fraction: α, initial fraction of each layer's active weights that is
            dropped and regrown (paper: 0.3).
        decay: f_decay, "cosine" (paper default) ``α/2 (1 + cos(π t / T_end))``,
            "linear" ``α (1 - t / T_end)`` or "constant" ``α``.
    """

    update_interval: int = 100
    end_step: int = 0
    begin_step: int | None = None
    drop_fraction: float = 0.3
    decay: str = "cosine"

    def __post_init__(self) -> None:
        _set(self, "update_interval", check_int(self.update_interval, "update_interval", low=1))
        defaulted = self.begin_step is None
        if defaulted:
            object.__setattr__(self, "begin_step", self.update_interval)
        _set(self, "begin_step", check_int(self.begin_step, "begin_step", low=0))
        _set(self, "end_step", check_int(self.end_step, "end_step", low=0))
        if defaulted and self.end_step <= self.begin_step:
            warn(
                f"no topology update will happen: end_step={self.end_step} comes before the "
                f"first update at step {self.begin_step} (= update_interval); lower "
                "update_interval for short runs"
            )
        elif self.end_step < self.begin_step:
            raise ConfigError(
                f"end_step={self.end_step} is before begin_step={self.begin_step}; "
                "the end step must come after the begin step"
            )
        _set(self, "drop_fraction", check_real(self.drop_fraction, "drop_fraction", low=0, high=1))
        if self.decay not in DECAYS:
            raise ConfigError(f"decay={self.decay!r} is unknown; allowed: {', '.join(DECAYS)}")

    def should_update(self, step: int) -> bool:
        """``t >= begin and t < T_end and (t - begin) % ΔT == 0``."""
        begin = self.begin_step
        assert begin is not None
        return begin <= step < self.end_step and (step - begin) % self.update_interval == 0

    def fraction(self, step: int) -> float:
        """f_decay(t; α, T_end): fraction of active weights to replace at step t."""
        if self.end_step == 0 or step >= self.end_step:
            return 0.0
        progress = step / self.end_step
        if self.decay == "cosine":
            return self.drop_fraction / 2.0 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "linear":
            return self.drop_fraction * (1.0 - progress)
        return float(self.drop_fraction)


@dataclass(frozen=True)
class PruningSchedule:
    """Gradual magnitude pruning (Zhu & Gupta, 2017): cubic ramp from dense to the target.

    ``s_t = s_final * (1 - (1 - (t - t0) / (t1 - t0))^3)`` for ``t0 <= t <= t1``,
    updated every ``update_interval`` steps and once more at ``end_step`` so the
    final sparsity is reached exactly.
    """

    begin_step: int
    end_step: int
    update_interval: int = 100

    def __post_init__(self) -> None:
        _set(self, "update_interval", check_int(self.update_interval, "update_interval", low=1))
        _set(self, "begin_step", check_int(self.begin_step, "begin_step", low=0))
        _set(self, "end_step", check_int(self.end_step, "end_step", low=0))
        if self.end_step < self.begin_step:
            raise ConfigError(
                f"end_step={self.end_step} is before begin_step={self.begin_step}; "
                "the end step must come after the begin step"
            )

    def should_update(self, step: int) -> bool:
        in_range = self.begin_step <= step < self.end_step
        on_grid = (step - self.begin_step) % self.update_interval == 0
        return (in_range and on_grid) or step == self.end_step

    def progress(self, step: int) -> float:
        """Fraction of the final sparsity reached at ``step`` (0 before t0, 1 after t1)."""
        if step <= self.begin_step:
            return 0.0 if step < self.end_step else 1.0
        if step >= self.end_step:
            return 1.0
        x = (step - self.begin_step) / (self.end_step - self.begin_step)
        return 1.0 - (1.0 - x) ** 3


def _set(schedule: Any, name: str, value: object) -> None:
    """Store a checked (plain int/float) value on a frozen schedule."""
    object.__setattr__(schedule, name, value)
