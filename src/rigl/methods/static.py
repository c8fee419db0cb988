"""Static sparse training: a random sparse network whose topology never changes."""

from __future__ import annotations

from typing import Any

from rigl.sparsifier import Sparsifier, register_method


@register_method("static")
class Static(Sparsifier):
    """Random sparse initialisation (any distribution) trained with a fixed mask."""

    supports_sparse_backend = True
    supports_sharding = True
    label = "Static"  # training cost: the default 3 f_S

    def build_schedule(self, **args: Any) -> None:
        return None
