"""The user-facing sparsifier: one lifecycle and one update loop for every method.

A method is a small subclass that says how masks start (``initial_mask``), when the
topology changes (``build_schedule``/``should_update``) and how one layer's new mask is
chosen (``plan_layer``, by default drop-by-magnitude and grow-by-``grow_score``), and
what it costs to train (``train_step_flops``). The hooks run after the whole ``__init__``
chain, so a subclass sets its attributes after ``super().__init__()``. The registry is
:mod:`rigl.registry` (its names are re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rigl import guard, summary
from rigl._version import __version__
from rigl.backends import check_materialised, choose_backends
from rigl.config import resolve_step
from rigl.errors import ConfigError, check_int, warn
from rigl.guard import UsageError
from rigl.optim_state import check_optimizer_kind
from rigl.registry import create, get_method, list_methods, register_method
from rigl.schedules import UpdateSchedule
from rigl.sharding import check_not_resharded, is_sharded
from rigl.storage import MaskedWeight, NonFiniteScore, RewireStats, RowScores, check_finite
from rigl.summary import LayerSummary
from rigl.targets import Target, check_model_names, make_config, scan_targets, target_counts
from rigl.topology import random_indices, split_evenly, update_generator

__all__ = ["LayerSummary", "Sparsifier", "create", "get_method", "list_methods", "register_method"]


class _BuiltAfterInit(type):
    """Runs ``_build`` (which calls the method hooks) after the whole ``__init__`` chain, so
    a subclass sets its attributes in the natural order, after ``super().__init__()``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        sparsifier = super().__call__(*args, **kwargs)
        sparsifier._build()
        return sparsifier


class Sparsifier(metaclass=_BuiltAfterInit):
    """Sparse training of ``model`` with ``optimizer``; ``step()`` replaces ``optimizer.step()``.

    Args:
        sparsity: S, the fraction of zeros over the sparsified layers.
        distribution: "uniform", "er" or "erk" (see :mod:`rigl.distributions`).
        total_steps: optimizer steps of the whole run (needed for fractional steps).
        update_interval: ΔT, steps between topology updates.
        begin_step / end_step: first update step / T_end (int, or float fraction of
            ``total_steps``; end default 0.75 as in the paper).
        drop_fraction: α; decay: f_decay ("cosine", "linear", "constant").
        seed: seeds initial masks, random growth and tie-breaking.
        skip_optimizer_step_on_update: on update steps, change the topology instead of
            taking the optimizer step (RigL's default, as in the paper's Algorithm 1).
        **options: fields of :class:`rigl.SparsityConfig` (first_layer_dense, ...).
    """

    name: ClassVar[str] = "base"
    update_before_step: ClassVar[bool] = False  # needs the gradient before the step
    default_skip_optimizer_step: ClassVar[bool] = False
    dense_start: ClassVar[bool] = False
    supports_sparse_backend: ClassVar[bool] = False  # starts sparse and needs no dense state
    aliases: ClassVar[tuple[str, ...]] = ()  # other names accepted by get_method
    label: ClassVar[str] = ""  # the row name in result tables (default: the name)
    sparse: ClassVar[bool] = True  # False: the dense baseline, trained at sparsity 0

    @classmethod
    def train_step_flops(
        cls, f_sparse: float, f_dense: float, *, update_interval: int, **facts: float
    ) -> float:
        """Mean training FLOPs of one step from the sparse and dense forward FLOPs ``f_S``,
        ``f_D``, ΔT and this method's schedule ``facts`` (see :meth:`train_flops_facts`;
        absent ones take the method's defaults). A dense step costs ``3 f_D`` (forward, and
        the gradients w.r.t. activations and weights); by default all three are sparse:
        ``3 f_S``. Used by :func:`rigl.train_flops_ratio`."""
        del f_dense, update_interval, facts
        return 3 * f_sparse

    def train_flops_facts(self) -> dict[str, float]:
        """The schedule facts of this run that :meth:`train_step_flops` reads, as fractions
        of ``total_steps`` (recorded in an experiment's ``final.json``)."""
        return {}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        sparsity: float = 0.9,
        distribution: str = "erk",
        total_steps: int | None = None,
        update_interval: int = 100,
        begin_step: int | float | None = None,
        end_step: int | float = 0.75,
        drop_fraction: float = 0.3,
        decay: str = "cosine",
        seed: int = 0,
        skip_optimizer_step_on_update: bool | None = None,
        backend: str = "masked",
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        guard.check_unclaimed(model)  # one sparsifier per tensor
        if total_steps is not None:
            total_steps = check_int(total_steps, "total_steps", low=1)
        self.model = model
        self.optimizer = optimizer
        self.config = make_config(sparsity=sparsity, distribution=distribution, **options)
        self.seed = check_int(seed, "seed")
        self.total_steps = total_steps
        self.schedule_args = {
            "update_interval": update_interval,
            "begin_step": resolve_step(begin_step, total_steps, "begin_step"),
            "end_step": end_step,
            "drop_fraction": drop_fraction,
            "decay": decay,
        }
        self._skip_option, self._backend_option = skip_optimizer_step_on_update, backend
        # called with the sparsifier after every successful topology update
        # (e.g. rigl.distributed.add_consistency_check)
        self.update_hooks: list[Callable[[Sparsifier], None]] = []

    def _build(self) -> None:
        """The second half of construction, run after every ``__init__`` (see
        :class:`_BuiltAfterInit`): targets, schedule and weights, through the hooks."""
        model, optimizer = self.model, self.optimizer
        self.targets: list[Target]
        self.targets, self.left_dense = scan_targets(model, self.config)
        self.schedule = self.build_schedule(**self.schedule_args)
        skip = self._skip_option
        self.skip_optimizer_step_on_update = (
            self.default_skip_optimizer_step if skip is None else bool(skip)
        )
        self._check_optimizer()
        check_optimizer_kind(self.optimizer, self.targets)
        self.target_counts = target_counts(self.targets, self.config)
        self.backend = self._check_backend(self._backend_option)
        # (backend, why) per target: backend="sparse" keeps what it cannot convert masked
        self.layer_backends = choose_backends(model, self.targets, self.backend)
        check_materialised(model, self.targets, self.layer_backends)
        self.weights = [
            self._make_weight(i, t, n)
            for i, (t, n) in enumerate(zip(self.targets, self.target_counts, strict=True))
        ]
        for weight in self.weights:
            weight.apply_mask()
        guard.claim(self, [w.param for w in self.weights])
        self._guard = guard.StepGuard(optimizer) if optimizer is not None else None
        self._removed = False
        self.step_count = 0
        self.skipped_updates = 0
        self.update_count = 0  # successful topology updates so far
        self.last_update: list[RewireStats] | None = None
        self._pending_update = False
        self._grads_masked = False  # by pre_optimizer_step, with this step's mask
        self._prepare_weights()

    def _check_backend(self, backend: str) -> str:
        if backend not in ("masked", "sparse"):
            raise ConfigError(f"backend={backend!r} is unknown; allowed: masked, sparse")
        if backend == "sparse" and not self.supports_sparse_backend:
            raise ConfigError(
                f"backend='sparse' does not support method {self.name!r}: it keeps dense state "
                "(a dense start or a dense gradient average); use backend='masked' or one of "
                + ", ".join(m for m in list_methods() if get_method(m).supports_sparse_backend)
            )
        return backend

    def _make_weight(self, index: int, target: Target, n_active: int) -> Any:
        """Masked storage, or compressed storage for plain Linear layers with backend='sparse'
        (built from the initial indices, so no dense mask exists; a Linear on the meta
        device is created from its shapes, see :func:`rigl.sparse.convert.convert_linear`)."""
        if is_sharded(target.param):  # FSDP2: a mask sharded like the weight (rigl.fsdp)
            from rigl.fsdp import sharded_weight

            return sharded_weight(self, index, target, n_active)
        if self.layer_backends[index][0] == "sparse":
            from rigl.sparse.convert import convert_linear

            weight, self.targets[index] = convert_linear(
                self.model,
                target,
                self.initial_indices(index, target, n_active),
                self.optimizer,
                update_generator(self.seed, -2, index),
            )
            return weight
        mask = self.initial_mask(index, target, n_active)
        return MaskedWeight(target.name, target.param, mask, target.blocks)

    # -- hooks for methods -------------------------------------------------------------
    def build_schedule(self, **args: Any) -> UpdateSchedule | None:
        end = resolve_step(args.pop("end_step"), self.total_steps, "end_step")
        return UpdateSchedule(end_step=end, **args)

    def should_update(self, step: int) -> bool:
        return self.schedule is not None and self.schedule.should_update(step)

    def initial_mask(self, index: int, target: Target, n_active: int) -> Tensor:
        """Exactly ``n_active`` weights at random (or all, for methods with a dense start)."""
        if self.dense_start:
            return torch.ones(target.shape, dtype=torch.bool)
        mask = torch.zeros(math.prod(target.shape), dtype=torch.bool)
        mask[self.initial_indices(index, target, n_active)] = True
        return mask.reshape(target.shape)

    def initial_indices(self, index: int, target: Target, n_active: int) -> Tensor:
        """Flat positions of the initial active weights (the True entries of
        :meth:`initial_mask`), drawn in O(n_active) memory for huge layers; a target of
        several row blocks draws each block's share in turn."""
        generator = update_generator(self.seed, -1, index)
        if target.blocks == 1:
            return random_indices(math.prod(target.shape), n_active, generator)
        size = math.prod(target.shape) // target.blocks
        return torch.cat(
            [
                random_indices(size, n, generator) + b * size
                for b, n in enumerate(split_evenly(n_active, target.blocks))
            ]
        )

    def observe_gradients(self) -> None:
        """Called every step before masking the gradients (SNFS keeps its EMA here)."""

    def grow_score(self, weight: MaskedWeight, generator: torch.Generator) -> RowScores:
        """Grow scores by row block (see :data:`rigl.storage.RowScores`)."""
        raise NotImplementedError(f"{type(self).__name__} does not grow connections")

    def plan_layer(
        self, index: int, weight: MaskedWeight, step: int, generator: torch.Generator
    ) -> Tensor | None:
        """New flat mask of one layer, or None to leave it unchanged."""
        n_update = math.floor(self.schedule.fraction(step) * weight.n_active)
        if n_update == 0:
            return None
        return weight.rewire(n_update, self.grow_score(weight, generator), generator)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state

    # -- the training-loop API -----------------------------------------------------------
    @property
    def masks(self) -> dict[str, Tensor]:
        """{full parameter name: bool mask}."""
        return {w.name: w.mask for w in self.weights}

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Replaces ``optimizer.step()``: optimizer step plus masking, or a topology update.

        With mixed precision pass the ``torch.amp.GradScaler``: ``step(scaler=scaler)`` then
        replaces ``scaler.step(optimizer); scaler.update()``. It unscales the gradients (unless
        you already called ``scaler.unscale_``, e.g. to clip), and when one is inf/NaN the
        scaler skips the optimizer step and the sparsifier skips the step too: no topology
        update, nothing counted (``step_count`` does not advance, so an update that was due
        runs on the next finite step), only ``scaler.update()`` lowers the scale.
        """
        self._check_not_removed()
        if self.optimizer is None:
            raise ConfigError(
                "step() needs the optimizer; this sparsifier was created with optimizer=None "
                "(call pre_optimizer_step()/post_optimizer_step() around your own step instead)"
            )
        if scaler is None or not scaler.is_enabled():
            if self.pre_optimizer_step():
                self.optimizer.step()
            self.post_optimizer_step()
            return
        if _unscale_found_inf(scaler, self.optimizer):
            scaler.update()
            return
        if self.pre_optimizer_step():
            scaler.step(self.optimizer)
        self.post_optimizer_step()
        scaler.update()

    def pre_optimizer_step(self) -> bool:
        """Everything before the optimizer step; returns whether to take it. The one
        optimizer step that may follow is allowed by the step guard (``rigl.guard``)."""
        self._check_not_removed()
        self._check_optimizer_state()
        check_not_resharded(self)
        if self._guard is not None:
            self._guard.open()
        step = self.step_count
        self.observe_gradients()
        due = self.should_update(step)
        # checked as computed, before any masking: a non-finite gradient skips the update
        finite = not due or self._gradients_finite(step)
        self._pending_update = due and finite and not self.update_before_step
        if due and self.update_before_step:
            updated = finite and self._update_topology(step, before_step=True)
            if not updated or self.skip_optimizer_step_on_update:
                return False  # skipped as in the paper, or the gradient was not finite
        elif due and self.skip_optimizer_step_on_update:
            return False  # the update comes after, in post_optimizer_step
        for weight in self.weights:
            weight.mask_gradient()
        self._grads_masked = True
        return True

    def post_optimizer_step(self) -> None:
        """Everything after the optimizer step: late topology update, masking, counting.

        On every path (update or not, before or after the step, step taken or skipped),
        ``step()`` ends with inactive weights and their ``.grad`` at zero and their
        optimizer state fresh, so code that reads ``.grad`` afterwards (gradient-norm
        logging, clipping hooks) sees only the active weights."""
        self._check_not_removed()
        if self._guard is not None:
            self._guard.close()
        masked, self._grads_masked = self._grads_masked, False
        if self._pending_update:
            self._pending_update = False
            masked = not self._update_topology(self.step_count) and masked
        for weight in self.weights:  # gradients again only if not masked with this mask
            weight.apply_mask(self.optimizer, gradient=not masked)
        self.step_count += 1
        self._prepare_weights()

    def _prepare_weights(self) -> None:
        """Tell each weight whether the coming step updates the topology (a compressed
        weight then keeps that backward's activations for its grow scores)."""
        update_due = self.should_update(self.step_count)
        for weight in self.weights:
            weight.prepare_step(update_due)

    def _rewired(self) -> list[int]:
        """The layers that take part in updates: not those whose target density is 1
        (``first_layer_dense``, a custom sparsity of 0), which have nothing to change."""
        return [i for i, w in enumerate(self.weights) if self.target_counts[i] < w.numel]

    def _gradients_finite(self, step: int) -> bool:
        try:
            for i in self._rewired():
                check_finite(self.weights[i].param.grad, self.weights[i].name)
        except NonFiniteScore as exc:
            self._skip_update(step, exc)
            return False
        return True

    def _skip_update(self, step: int, reason: NonFiniteScore) -> None:
        self.skipped_updates += 1
        warn(f"skipping the topology update at step {step}: {reason}")

    @torch.no_grad()
    def _update_topology(self, step: int, before_step: bool = False) -> bool:
        """Plan every layer first, then apply: a non-finite score leaves all masks as they were.

        Layers that take no part (:meth:`_rewired`) are never planned. Grown weights keep
        their gradient of this batch when the update comes ``before_step`` (the step, if
        taken, moves them); after the step it has been applied, and theirs is zero."""
        try:
            plans = {
                i: self.plan_layer(i, self.weights[i], step, update_generator(self.seed, step, i))
                for i in self._rewired()
            }
        except NonFiniteScore as exc:
            self._skip_update(step, exc)
            return False
        self.last_update = [
            w.set_topology(plans[i], self.optimizer, grown_gradient=before_step)
            if plans.get(i) is not None
            else RewireStats(w.name, w.n_active, 0, 0)
            for i, w in enumerate(self.weights)
        ]
        self.update_count += 1
        for hook in self.update_hooks:
            hook(self)
        return True

    # -- inspection and checkpoints ----------------------------------------------------------
    def summary(self) -> list[LayerSummary]:
        """Per sparsified tensor: target and measured density, counts, backend and why."""
        return summary.summarize(self)

    def summary_table(self) -> str:
        return summary.format_table(self.summary(), self.left_dense)

    def check(self) -> None:
        """Verify the sparsity invariants now (exact counts, zeros at inactive positions,
        optimizer state there); raises :class:`rigl.InvariantError` naming each broken layer.
        Costs a pass over every sparsified weight: meant for tests and debugging."""
        summary.check(self)

    def remove(self) -> None:
        """Release the model: the step guard leaves the optimizer, and another sparsifier
        may be created for the model. Weights keep their values (zeros included) and
        layers stay as they are (``rigl.sparse.convert.to_dense`` turns ``SparseLinear``
        layers back into ``nn.Linear``). The sparsifier cannot step afterwards."""
        if self._guard is not None:
            self._guard.remove()
        guard.release(self)
        self._removed = True

    def _check_not_removed(self) -> None:
        if self._removed:
            raise UsageError("this sparsifier was removed (remove()); create a new one")

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "rigl_version": __version__,
            "method": self.name,
            "step": self.step_count,
            "skipped_updates": self.skipped_updates,
            "update_count": self.update_count,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "masks": {w.name: w.topology_state() for w in self.weights},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks, step and method state; model and optimizer are restored by the caller."""
        if not isinstance(state, dict) or "masks" not in state or "step" not in state:
            raise ConfigError("state dict is not a rigl sparsifier state (no 'masks'/'step' keys)")
        if state.get("method") != self.name:
            raise ConfigError(
                f"state dict was saved by method {state.get('method')!r}, this sparsifier is {self.name!r}"
            )
        check_model_names(self.targets, state["masks"])
        masks = [w.check_topology(state["masks"][w.name]) for w in self.weights]  # all first
        for weight, mask in zip(self.weights, masks, strict=True):
            weight.load_topology(mask, self.optimizer)  # compressed: the optimizer state too
        self.step_count = int(state["step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.update_count = int(state.get("update_count", 0))
        self.load_extra_state(state.get("extra", {}))
        self._prepare_weights()

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            return
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [t.name for t in self.targets if id(t.param) not in in_optimizer]
        if missing:
            raise ConfigError(
                f"parameters {missing} are sparsified but not in the optimizer; create the "
                "sparsifier with the optimizer that trains this model"
            )

    def _check_optimizer_state(self) -> None:
        """A compressed layer's active count can change outside the sparsifier (its
        ``model.load_state_dict`` or ``load_sparse`` without the sparsifier): its optimizer
        state is then of the old size, which the optimizer would fail on. (A 1-D state of a
        1-D parameter has its shape in every torch optimizer; masked weights are >= 2-D.)"""
        if self.optimizer is None:
            return
        for weight in self.weights:
            param = weight.param
            for key, value in self.optimizer.state.get(param, {}).items():
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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.config.sparsity}, "
            f"distribution={self.config.distribution!r}, layers={len(self.weights)}, step={self.step_count})"
        )


def _unscale_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
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
