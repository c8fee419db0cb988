"""The library's error type, the number checks every argument goes through, and warnings
that point at the user's line.

A number argument accepts any real number (``int``, ``float``, numpy scalars such as
``np.float32(0.9)``); ``bool`` is refused (``True`` is an ``int`` to Python, never a
sparsity or a step), so are NaN and inf. An integer argument accepts ``int`` and numpy
integers and refuses floats: ``update_interval=2.5`` or ``seed=1.7`` would otherwise be
truncated silently.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from types import FrameType
from typing import Any


class ConfigError(ValueError):
    """A bad argument: the message names the argument, the value and what is allowed."""


class RunError(RuntimeError):
    """A command that could not finish its work, for reasons its message states in full
    (the ``rigl`` CLI prints it on one line, without a traceback; e.g. runs of a sweep
    that failed while the others finished)."""


def check_real(
    value: Any,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a float if it is a finite real number in the interval, else ConfigError.

    ``hint`` is appended to the message (e.g. what the argument means)."""
    where = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number{where}{hint}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} must be a finite number{where}{hint}")
    below = number < low or (low_open and number == low)
    above = number > high or (high_open and number == high)
    if below or above:
        if math.isfinite(low) and math.isfinite(high):
            raise ConfigError(f"{name}={value!r} is outside {where.removeprefix(' in ')}{hint}")
        raise ConfigError(f"{name}={value!r} must be{where}{hint}")
    return number


def check_int(value: Any, name: str, *, low: int | None = None, hint: str = "") -> int:
    """``value`` as an int if it is an integer (not a float, not a bool) >= ``low``."""
    where = "" if low is None else f" >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}={value!r} must be an int{where}{hint}")
    if low is not None and value < low:
        raise ConfigError(f"{name}={value!r} must be an int{where}{hint}")
    return int(value)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number that :func:`check_real` would look at (no bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer that :func:`check_int` would look at (no bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isfinite(low) and math.isfinite(high):
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if math.isfinite(low):
        return f" {'>' if low_open else '>='} {low:g}"
    if math.isfinite(high):
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


# Frames of these packages are skipped when a warning is attributed: the library itself, and
# torch, whose Module.__call__ runs our layers from the user's line. Known by module name,
# not file: a dataclass's generated __init__ (a frozen schedule's checks) has no file.
_LIBRARIES = ("rigl", "torch")


def _in_library(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__", "")
    return module.partition(".")[0] in _LIBRARIES


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside rigl (and torch), so that a
    warning raised inside ``create()`` or ``step()`` points at the user's line, whatever
    the depth of the library's own calls."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is the caller of this function
    while frame.f_back is not None and _in_library(frame):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
