"""Optimizer state per weight: which optimizers can follow a mask, and what fresh state is.

Most optimizers keep state tensors shaped like the weight, one value per weight (SGD
momentum, Adam's moments, Adagrad's ``sum``, Rprop's step sizes, ...). A grown weight must
start as a weight the optimizer has never seen, and an inactive weight holds that same
fresh state, so the value torch.optim starts each tensor at is needed: zero for most,
``initial_accumulator_value`` for Adagrad's ``sum`` and the learning rate for Rprop's
``step_size`` (with zero there, Rprop's step size of a grown weight could only grow back
from its floor of 1e-6). State that is not weight-shaped (Adam's ``step``, Adafactor's
factored row and column averages) is shared by the whole tensor and left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rigl.errors import ConfigError

# (optimizer class name, state key) -> the param-group hyperparameter that torch.optim
# starts that weight-shaped state at; every other weight-shaped state starts at zero.
# Subclasses inherit the rule of the torch.optim class they derive from.
_FRESH_FROM_GROUP = {
    ("Adagrad", "sum"): "initial_accumulator_value",
    ("Rprop", "step_size"): "lr",
}

# Weight-shaped state that a zero gradient moves away from its initial value, so that it is
# reset at the inactive weights after every step (any other state of an inactive weight
# stays fresh by itself, and resetting it every step would cost a pass per tensor):
# Adamax's ``exp_inf = max(beta2 * exp_inf, |g| + eps)`` becomes ``eps``.
_DRIFTING = {("Adamax", "exp_inf")}


def check_optimizer_kind(optimizer: torch.optim.Optimizer | None, targets: Sequence[Any]) -> None:
    """Refuse, by name, the optimizers whose state or step cannot follow a mask.

    ``targets`` are the sparsified parameters (:class:`rigl.targets.Target`)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError(
            "optimizer LBFGS is not supported: its step needs a closure (sparsifier.step() "
            "takes none) and it keeps one flat history over all parameters that no mask "
            "can follow; use a first-order optimizer (SGD, Adam, ...)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        dense = [
            t.name
            for t in targets
            if not (isinstance(t.module, nn.Embedding) and t.module.sparse)
            and _optimizes(optimizer, t.param)
        ]
        if dense:
            raise ConfigError(
                f"optimizer SparseAdam takes only sparse gradients (nn.Embedding(sparse=True)), "
                f"but the sparsified parameters {dense} get dense ones; use Adam for them"
            )


def weight_states(
    optimizer: torch.optim.Optimizer | None, param: Tensor
) -> dict[str, tuple[Tensor, float | Tensor]]:
    """``{key: (state tensor, fresh value)}`` for every state tensor of ``param`` shaped like
    it (the fresh value: what the optimizer starts that state at)."""
    if optimizer is None:
        return {}
    state = optimizer.state.get(param)
    if not state:
        return {}
    return {
        key: (value, fresh_value(optimizer, param, key))
        for key, value in state.items()
        if isinstance(value, Tensor) and value.shape == param.shape
    }


def fresh_value(optimizer: torch.optim.Optimizer, param: Tensor, key: str) -> float | Tensor:
    """What ``optimizer`` starts the weight-shaped state ``key`` of ``param`` at."""
    for cls in type(optimizer).__mro__:
        hyper = _FRESH_FROM_GROUP.get((cls.__name__, key))
        if hyper is not None:
            value = _group_of(optimizer, param)[hyper]
            return value if isinstance(value, Tensor) else float(value)
    return 0.0


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer | None, param: Tensor, where: Tensor
) -> None:
    """Set every weight-shaped optimizer state tensor of ``param`` to its fresh value at
    ``where`` (a bool tensor shaped like ``param``); scalar state (Adam's ``step``) is kept."""
    for value, fresh in weight_states(optimizer, param).values():
        if value.is_sparse:  # SGD momentum of a sparse gradient: zero-initialised state
            value.mul_(~where)
        else:
            value.masked_fill_(where, fresh)


def reset_drifting_state(
    optimizer: torch.optim.Optimizer | None, param: Tensor, where: Tensor
) -> None:
    """:func:`reset_optimizer_state` for the state that moves under a zero gradient only."""
    if optimizer is None or not optimizer.state.get(param):
        return
    names = {cls.__name__ for cls in type(optimizer).__mro__}
    state = optimizer.state[param]
    for name, key in _DRIFTING:
        value = state.get(key)
        if name in names and isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(where, fresh_value(optimizer, param, key))


def _optimizes(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


def _group_of(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Any]:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise KeyError("parameter is not in the optimizer")


def check_in_optimizer(optimizer: torch.optim.Optimizer | None, targets: Sequence[Any]) -> None:
    """Every sparsified parameter (``targets[i].param``, named ``.name``) is in ``optimizer``."""
    if optimizer is None:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [t.name for t in targets if id(t.param) not in in_optimizer]
    if missing:
        raise ConfigError(
            f"parameters {missing} are sparsified but not in the optimizer; create the "
            "sparsifier with the optimizer that trains this model"
        )


def check_state_sizes(optimizer: torch.optim.Optimizer | None, weights: Sequence[Any]) -> None:
    """A compressed layer's active count can change outside the sparsifier (its
    ``model.load_state_dict`` or ``load_sparse`` without the sparsifier): its optimizer
    state is then of the old size, which the optimizer would fail on. (A 1-D state of a
    1-D parameter has its shape in every torch optimizer; masked weights are >= 2-D.)"""
    if optimizer is None:
        return
    for weight in weights:
        param = weight.param
        for key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, Tensor) or value.dim() != 1 or param.dim() != 1:
                continue
            if value.shape != param.shape:
                raise ConfigError(
                    f"the optimizer state of {weight.name} ({key!r}: {value.numel()} "
                    f"entries) does not match its {param.numel()} active weights: the "
                    "topology was replaced (model.load_state_dict, or load_sparse without "
                    "the sparsifier) but not the optimizer state. Also load the optimizer "
                    "state saved with the model, or load the topology through "
                    "sparsifier.load_state_dict() / load_sparse(path, model, sparsifier), "
                    "which move the optimizer state along"
                )


def unscale_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Unscale the gradients of ``optimizer`` and say whether one is inf/NaN, i.e. whether
    ``scaler.step`` is going to skip the optimizer step (the same test the scaler makes)."""
    try:
        scaler.unscale_(optimizer)
    except RuntimeError as exc:  # the caller unscaled already (to clip): fine
        if "already been called" not in str(exc):
            raise
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    grads = [g.coalesce().values() if g is not None and g.is_sparse else g for g in grads]
    finite = [torch.isfinite(g).all() for g in grads if g is not None]
    return bool(finite) and not bool(torch.stack(finite).all())
