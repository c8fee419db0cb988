"""Every registered method; importing this package fills the registry.

Every module of this package is imported (a new method is one new file, registered with
``@register_method``, and nothing else names it); the classes below are re-exported as
``rigl.GMP``, ``rigl.RigL``, ... for the methods of the RigL paper.
"""

import importlib
import pkgutil

from rigl.methods.dense import Dense
from rigl.methods.gmp import GMP
from rigl.methods.rigl import RigL
from rigl.methods.set import SET
from rigl.methods.snfs import SNFS
from rigl.methods.snip import SNIP
from rigl.methods.static import Static

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GMP", "SET", "SNFS", "SNIP", "Dense", "RigL", "Static"]
