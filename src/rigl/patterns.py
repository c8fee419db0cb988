"""Structured sparsity patterns: which masks a layer may have, as pure functions of its shape.

A weight is viewed as ``(rows, cols)`` (``cols`` = inputs times kernel positions); a flat
position is ``row * cols + col``. The patterns:

- ``"unstructured"``: any mask (the default).
- ``"N:M"`` (e.g. ``"2:4"``): exactly N active in every group of M consecutive inputs of a
  row (``cols % M == 0``). Its density is N/M in every sparsified layer.
- ``"fanin"``: every output row keeps the same number of active inputs (SRigL's constant
  fan-in, Lasby et al., 2024).
- ``"block:RxC"``: whole R x C tiles of the ``(rows, cols)`` view are active or not
  (``rows % R == 0`` and ``cols % C == 0``).

Each pattern is held by equal contiguous groups of flat positions that keep their own
count (N:M: segments of M; fan-in: rows), or by a tile grid on which selection runs as if
unstructured (blocks). A sparse layer whose shape cannot hold the pattern (LeNet-300-100's
300 inputs under 1:8) is left unstructured, with a warning naming it and why, at the
count the distribution gives it; the summary notes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from rigl.errors import ConfigError
from rigl.topology import split_evenly

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")
ALLOWED = '"unstructured", "fanin", "N:M" (e.g. "2:4") or "block:RxC" (e.g. "block:4x4")'


@dataclass(frozen=True)
class Pattern:
    """A parsed pattern: ``kind`` is "unstructured", "nm", "fanin" or "block"; ``n, m``
    for N:M; ``r, c`` the tile of a block pattern."""

    kind: str = "unstructured"
    n: int = 0
    m: int = 0
    r: int = 0
    c: int = 0

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.r}x{self.c}"
        return self.kind

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    def misfit(self, rows: int, cols: int, blocks: int = 1) -> str:
        """Why a ``(rows, cols)`` view cannot hold the pattern, or "" when it can."""
        if self.kind == "nm" and cols % self.m:
            return f"{cols} inputs per row are not a multiple of {self.m}"
        if self.kind == "block" and (rows % (self.r * blocks) or cols % self.c):
            what = f"{rows} x {cols}" + (f" in {blocks} row blocks (q, k, v)" if blocks > 1 else "")
            return f"{what} does not split into {self.r}x{self.c} tiles"
        return ""

    def unit(self, rows: int, cols: int, blocks: int = 1) -> int:
        """Active counts the pattern can hold are multiples of this (and at most rows*cols)."""
        if self.kind == "fanin":
            return rows
        if self.kind == "nm":
            return rows * cols // self.m * self.n
        if self.kind == "block":
            return self.r * self.c * blocks
        return blocks if blocks > 1 else 1


UNSTRUCTURED = Pattern()


def parse_pattern(text: object) -> Pattern:
    """``"2:4"`` -> Pattern("nm", n=2, m=4), etc.; a ConfigError naming what is allowed."""
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"pattern={text!r} must be a string: {ALLOWED}")
    spec = text.strip().lower()
    if spec in ("unstructured", "fanin"):
        return Pattern(spec)
    if match := _NM.match(spec):
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ConfigError(
                f"pattern={text!r}: N:M needs 0 < N < M (N active in every M inputs), "
                f"got N={n}, M={m}"
            )
        return Pattern("nm", n=n, m=m)
    if match := _BLOCK.match(spec):
        r, c = int(match[1]), int(match[2])
        if r < 1 or c < 1:
            raise ConfigError(f"pattern={text!r}: block sides must be >= 1, got {r}x{c}")
        return Pattern("block", r=r, c=c)
    raise ConfigError(f"pattern={text!r} is unknown; allowed: {ALLOWED}")


def fit_count(pattern: Pattern, ideal: float, rows: int, cols: int, blocks: int = 1) -> int:
    """The count nearest ``ideal`` the pattern holds: a multiple of its unit, at least one
    unit (an empty layer cuts the network), at most every position."""
    numel = rows * cols
    if pattern.kind == "nm":
        return pattern.unit(rows, cols)
    unit = pattern.unit(rows, cols, blocks)
    return min(max(round(ideal / unit), 1) * unit, numel // unit * unit)


def fit_counts(
    pattern: Pattern, ideal: list[int], shapes: list[tuple[int, int, int]], budget: int
) -> list[int]:
    """Counts the pattern holds for layers of ``(rows, cols, blocks)``, from the unstructured
    ``ideal`` counts, their total as close to ``budget`` as whole units allow: every layer
    first gets its nearest count (:func:`fit_count`), then units are added to (or taken
    from) the layers whose count moved furthest from their ideal, while that brings the
    total closer to the budget."""
    counts = [fit_count(pattern, n, *s) for n, s in zip(ideal, shapes, strict=True)]
    if pattern.kind == "nm":
        return counts
    units = [pattern.unit(*s) for s in shapes]
    caps = [s[0] * s[1] // u * u for s, u in zip(shapes, units, strict=True)]
    while True:
        gap = budget - sum(counts)
        sign = 1 if gap > 0 else -1
        movable = [
            i
            for i in range(len(counts))
            if (counts[i] + sign * units[i] <= caps[i] if sign > 0 else counts[i] > units[i])
            and abs(gap - sign * units[i]) < abs(gap)
        ]
        if not gap or not movable:
            return counts
        best = max(movable, key=lambda i: (sign * (ideal[i] - counts[i]) / units[i], -i))
        counts[best] += sign * units[best]


def initial_positions(
    pattern: Pattern,
    rows: int,
    cols: int,
    n_active: int,
    generator: torch.Generator,
    blocks: int = 1,
) -> Tensor:
    """Random sorted flat positions of ``n_active`` weights that hold the pattern: fan-in
    ``n_active / rows`` per row, N:M ``N`` per group, blocks ``n_active / (R C)`` tiles
    (split evenly over ``blocks`` row blocks); each uniform among what the pattern allows."""
    if pattern.kind in ("fanin", "nm"):
        size = cols if pattern.kind == "fanin" else pattern.m
        groups = rows * cols // size
        per_group = n_active // groups
        priority = torch.rand(groups, size, generator=generator)
        local = torch.topk(priority, per_group, dim=1).indices
        flat = local + torch.arange(groups).unsqueeze(1) * size
        return torch.sort(flat.reshape(-1)).values
    if pattern.kind == "block":
        per_block = rows // pattern.r * (cols // pattern.c) // blocks  # tiles in a row block
        n_tiles = n_active // (pattern.r * pattern.c)
        tiles = [
            torch.randperm(per_block, generator=generator)[:n] + b * per_block
            for b, n in enumerate(split_evenly(n_tiles, blocks))
        ]
        return torch.sort(tile_members(torch.cat(tiles), pattern, cols)).values
    raise ValueError(f"initial_positions is for structured patterns, not {pattern}")


def tile_members(tiles: Tensor, pattern: Pattern, cols: int) -> Tensor:
    """Flat positions of every weight in the tiles ``tiles`` (tile ids, row-major on the
    ``(rows / R, cols / C)`` tile grid), tile after tile."""
    tile_cols = cols // pattern.c
    top = (tiles // tile_cols) * pattern.r
    left = (tiles % tile_cols) * pattern.c
    r = torch.arange(pattern.r, device=tiles.device)
    c = torch.arange(pattern.c, device=tiles.device)
    offsets = (r.unsqueeze(1) * cols + c.unsqueeze(0)).reshape(-1)  # (R C,)
    return ((top * cols + left).unsqueeze(1) + offsets.unsqueeze(0)).reshape(-1)


def tile_of(flat: Tensor, pattern: Pattern, cols: int) -> Tensor:
    """The tile id of each flat position."""
    return (flat // cols // pattern.r) * (cols // pattern.c) + (flat % cols) // pattern.c


def violations(pattern: Pattern, active: Tensor, rows: int, cols: int) -> list[str]:
    """How the sorted active flat positions break the pattern (empty when they hold it):
    fan-in and N:M need equal counts per row / group, blocks whole tiles."""
    if not pattern.structured or active.numel() == 0:
        return []
    if pattern.kind in ("fanin", "nm"):
        size = cols if pattern.kind == "fanin" else pattern.m
        counts = torch.bincount(active // size, minlength=rows * cols // size)
        low, high = int(counts.min()), int(counts.max())
        what = "row" if pattern.kind == "fanin" else f"group of {pattern.m}"
        # equal counts (the total is checked against the target elsewhere: with it, N per
        # group; a dense start pruned part way, GMP, has more than N for now)
        return (
            [f"pattern {pattern}: between {low} and {high} active per {what}"]
            if low != high
            else []
        )
    counts = torch.bincount(tile_of(active, pattern, cols))
    partial = int(((counts > 0) & (counts < pattern.r * pattern.c)).count_nonzero())
    return [f"pattern {pattern}: {partial} tiles partly active"] if partial else []
