"""Guard rails: one sparsifier per tensor, and no optimizer step behind its back.

Both misuses train silently wrong (dense weights under a summary that says sparse; two
sets of masks and counts for one tensor), so both are refused with an error naming the fix.

- **Ownership.** Creating a sparsifier claims the tensors it sparsifies; another
  sparsifier on a model holding a claimed tensor is a ``ConfigError`` until the first one
  is released (``sparsifier.remove()``) or garbage-collected. Claims are weak references,
  so nothing here keeps a model or a sparsifier alive.
- **Step guard.** A post-hook on ``optimizer.step`` (``register_step_post_hook``): the
  sparsifier opens a window in ``pre_optimizer_step`` and closes it in
  ``post_optimizer_step``; a step that ends outside a window, or a second one inside,
  raises :class:`UsageError`. The framework callbacks step inside the window, so they are
  unaffected. A post-hook, not a pre-hook: Lightning calls ``optimizer.step(closure)``
  and runs forward, backward and ``on_before_optimizer_step`` (which opens the window)
  inside it, so the window is open only once the step is under way.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from rigl.config import ConfigError


class UsageError(RuntimeError):
    """The sparsifier is driven in a way that would silently train something else."""


class InvariantError(RuntimeError):
    """:meth:`rigl.Sparsifier.check` found a broken invariant; the message names the layer."""


_STEP_OUTSIDE = (
    "optimizer.step() was called outside the sparsifier: the weights it moves are no longer "
    "masked and topology updates are missed, so training goes on dense while the summary "
    "says sparse. Call sparsifier.step() instead of optimizer.step() (it takes the optimizer "
    "step itself; with torch.ao.pruning's habit `optimizer.step(); sparsifier.step()`, drop "
    "the optimizer.step() call). A framework that steps the optimizer itself: call "
    "sparsifier.pre_optimizer_step() before and sparsifier.post_optimizer_step() after its "
    "step, or use rigl.integrations (Lightning RigLCallback, Hugging Face RigLTrainerCallback)."
)
_STEP_TWICE = (
    "optimizer.step() was called twice between sparsifier.pre_optimizer_step() and "
    "post_optimizer_step(): one sparse training step takes one optimizer step. Take it "
    "once (sparsifier.step() takes it for you)."
)


class StepGuard:
    """Refuses optimizer steps the sparsifier does not expect (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.window = False  # between pre_optimizer_step and post_optimizer_step
        self.stepped = False
        me = weakref.ref(self)  # the optimizer must not keep the sparsifier alive

        def hook(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            guard = me()
            if guard is not None:
                guard.after_step()

        self._handle = optimizer.register_step_post_hook(hook)
        weakref.finalize(self, self._handle.remove)

    def open(self) -> None:
        self.window, self.stepped = True, False

    def close(self) -> None:
        self.window = False

    def after_step(self) -> None:
        if not self.window:
            raise UsageError(_STEP_OUTSIDE)
        if self.stepped:
            raise UsageError(_STEP_TWICE)
        self.stepped = True

    def remove(self) -> None:
        self._handle.remove()


# id(tensor) -> (the tensor, its sparsifier), both weak: an id can be reused once the
# tensor is gone, so the entry counts only while its tensor is the same object.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner_of(tensor: torch.Tensor) -> Any:
    entry = _OWNERS.get(id(tensor))
    if entry is None:
        return None
    if entry[0]() is not tensor or entry[1]() is None:
        del _OWNERS[id(tensor)]
        return None
    return entry[1]()


def check_unclaimed(model: nn.Module) -> None:
    """Raise if a tensor of ``model`` belongs to a live sparsifier."""
    for name, param in model.named_parameters():
        owner = _owner_of(param)
        if owner is not None:
            raise ConfigError(
                f"{type(model).__name__} already has a sparsifier ({owner!r} owns {name}); "
                "a second one would keep its own masks and counts, which are not the "
                "weights'. Keep using the first, or release it with first.remove() before "
                "creating another"
            )


def claim(owner: object, tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        _OWNERS[id(tensor)] = (weakref.ref(tensor), weakref.ref(owner))


def release(owner: object) -> None:
    for key in [k for k, (_, ref) in _OWNERS.items() if ref() in (owner, None)]:
        del _OWNERS[key]
