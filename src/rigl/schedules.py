"""When to update the topology and by how much. Frozen dataclasses told the step."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from rigl.config import ConfigError

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
        if isinstance(self.update_interval, bool) or not (
            isinstance(self.update_interval, int) and self.update_interval >= 1
        ):
            raise ConfigError(f"update_interval={self.update_interval!r} must be an int >= 1")
        defaulted = self.begin_step is None
        if defaulted:
            object.__setattr__(self, "begin_step", self.update_interval)
        if not isinstance(self.begin_step, int) or self.begin_step < 0:
            raise ConfigError(f"begin_step={self.begin_step!r} must be an int >= 0")
        if not isinstance(self.end_step, int) or self.end_step < 0:
            raise ConfigError(f"end_step={self.end_step!r} must be an int >= 0")
        if defaulted and self.end_step <= self.begin_step:
            warnings.warn(
                f"no topology update will happen: end_step={self.end_step} comes before the "
                f"first update at step {self.begin_step} (= update_interval); lower "
                "update_interval for short runs",
                stacklevel=4,
            )
        elif self.end_step < self.begin_step:
            raise ConfigError(
                f"end_step={self.end_step} is before begin_step={self.begin_step}; "
                "the end step must come after the begin step"
            )
        if not (isinstance(self.drop_fraction, int | float) and 0.0 <= self.drop_fraction <= 1.0):
            raise ConfigError(f"drop_fraction={self.drop_fraction!r} must be in [0, 1]")
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
        if self.update_interval < 1:
            raise ConfigError(f"update_interval={self.update_interval!r} must be >= 1")
        if self.begin_step < 0:
            raise ConfigError(f"begin_step={self.begin_step!r} must be >= 0")
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
