"""Every registered method; importing this package fills the registry."""

from rigl.methods.dense import Dense
from rigl.methods.gmp import GMP
from rigl.methods.rigl import RigL
from rigl.methods.set import SET
from rigl.methods.snfs import SNFS
from rigl.methods.snip import SNIP
from rigl.methods.static import Static

__all__ = ["GMP", "SET", "SNFS", "SNIP", "Dense", "RigL", "Static"]
