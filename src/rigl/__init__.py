"""rigl: sparse training from scratch with RigL and its family (public API is filled in by rigl.sparsifier)."""

from rigl._version import __version__

__all__ = ["__version__"]
