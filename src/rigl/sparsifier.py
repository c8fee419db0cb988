"""The user-facing sparsifier: one lifecycle and one update loop for every method.

A method is a small subclass that says how masks start (``initial_mask``), when the
topology changes (``build_schedule``/``should_update``), how one layer's topology change
is chosen (``plan_layer``, by default drop by ``drop_score`` and grow by ``grow_score``,
chosen by :mod:`rigl.selection`), and what it costs to train (``train_step_flops``). The
weights are :class:`rigl.seam.SparseStorage` objects, masked or compressed; a method reads
them through that interface only. The hooks run after the whole ``__init__`` chain, so a
subclass sets its attributes after ``super().__init__()``. The step loop is
:mod:`rigl.step_loop`; the registry is :mod:`rigl.registry` (its names are re-exported).

Over 300 lines: construction, the hooks' default implementations and inspection are one
class's methods, each documented for method writers; the step loop already lives apart.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rigl import guard, summary
from rigl.backends import check_materialised, choose_backends
from rigl.config import resolve_step
from rigl.errors import ConfigError, check_int, warn
from rigl.guard import UsageError
from rigl.optim_state import check_in_optimizer, check_optimizer_kind
from rigl.patterns import initial_positions
from rigl.registry import create, get_method, list_methods, register_method
from rigl.rewiring import Rewiring, RowScores
from rigl.schedules import UpdateSchedule
from rigl.seam import RewireStats, SparseStorage
from rigl.sharding import is_sharded
from rigl.step_loop import StepLoop
from rigl.storage import MaskedWeight
from rigl.summary import LayerSummary
from rigl.targets import (
    Target,
    make_config,
    requested_counts,
    scan_targets,
    target_counts,
    target_patterns,
    view_2d,
)
from rigl.topology import random_indices, split_evenly, update_generator

__all__ = ["LayerSummary", "Sparsifier", "create", "get_method", "list_methods", "register_method"]


class _BuiltAfterInit(type):
    """Runs ``_build`` (which calls the method hooks) after the whole ``__init__`` chain, so
    a subclass sets its attributes in the natural order, after ``super().__init__()``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        sparsifier = super().__call__(*args, **kwargs)
        sparsifier._build()
        return sparsifier


class Sparsifier(StepLoop, metaclass=_BuiltAfterInit):
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
    # trains a model sharded with FSDP2 (rigl.fsdp): drop and grow through the sharded
    # selection, no dense state of its own
    supports_sharding: ClassVar[bool] = False
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
        check_in_optimizer(self.optimizer, self.targets)
        check_optimizer_kind(self.optimizer, self.targets)
        # the distribution's counts, then rounded to what the pattern holds (the summary
        # shows how far the total moved)
        self.requested_counts = requested_counts(self.targets, self.config)
        self.target_counts = target_counts(self.targets, self.config, self.requested_counts)
        self.patterns = target_patterns(self.targets, self.target_counts, self.config)
        self.backend = self._check_backend(self._backend_option)
        # (backend, why) per target: backend="sparse" keeps what it cannot convert masked
        self.layer_backends = choose_backends(model, self.targets, self.backend)
        check_materialised(model, self.targets, self.layer_backends)
        _warn_if_already_sparse(self.targets, self.target_counts)
        self.weights: list[SparseStorage] = [
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
        self._mask_early = False
        self._early_hooks = self._early_gradient_masking()
        self._prepare_weights()

    def _early_gradient_masking(self) -> list[Any]:
        """Masked weights get their inactive gradient zeroed as soon as backward has
        accumulated it (on steps that do not update the topology), so what runs between
        ``backward()`` and ``step()`` (gradient clipping, the Hugging Face Trainer's
        ``max_grad_norm``, gradient-norm logging) sees the sparse network's gradient, as on
        the compressed backend. ``pre_optimizer_step`` masks again (a user's change to
        ``.grad`` in between). Update steps keep the dense gradient for the grow scores, and
        methods that read it every step (an ``observe_gradients`` of their own: SNFS, SR-STE,
        Top-KAST) keep it until ``pre_optimizer_step`` as before."""
        if type(self).observe_gradients is not Sparsifier.observe_gradients:
            return []
        owner = weakref.ref(self)  # the hooks must not keep a dropped sparsifier alive

        def hook(weight: MaskedWeight) -> Callable[[Tensor], None]:
            def mask(_: Tensor) -> None:
                sparsifier = owner()
                if sparsifier is not None and sparsifier._mask_early:
                    weight.mask_gradient()

            return mask

        return [
            w.param.register_post_accumulate_grad_hook(hook(w))
            for w in self.weights
            if type(w) is MaskedWeight and w.param.requires_grad
        ]

    def _check_backend(self, backend: str) -> str:
        if backend not in ("masked", "sparse"):
            raise ConfigError(f"backend={backend!r} is unknown; allowed: masked, sparse")
        if backend == "sparse" and isinstance(
            self.model, torch.nn.parallel.DistributedDataParallel
        ):  # its reducer would keep the replaced layers' parameters
            raise ConfigError(
                "backend='sparse' replaces layers, which a model already wrapped in "
                "DistributedDataParallel cannot follow: create the sparsifier on the plain "
                "model first, then wrap it (rigl.distributed.wrap_model)"
            )
        if backend == "sparse" and not self.supports_sparse_backend:
            raise ConfigError(
                f"backend='sparse' does not support method {self.name!r}: it keeps dense state "
                "(a dense start or a dense gradient average); use backend='masked' or one of "
                + ", ".join(m for m in list_methods() if get_method(m).supports_sparse_backend)
            )
        return backend

    def _make_weight(self, index: int, target: Target, n_active: int) -> SparseStorage:
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
                self.patterns[index],
            )
            return weight
        return self.masked_weight(index, target, self.initial_mask(index, target, n_active))

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
        several row blocks draws each block's share in turn; under a structured pattern the
        positions hold it (:func:`rigl.patterns.initial_positions`)."""
        generator = update_generator(self.seed, -1, index)
        if self.patterns[index].structured:
            rows, cols = view_2d(target)
            return initial_positions(
                self.patterns[index], rows, cols, n_active, generator, target.blocks
            )
        if target.blocks == 1:
            return random_indices(math.prod(target.shape), n_active, generator)
        size = math.prod(target.shape) // target.blocks
        return torch.cat(
            [
                random_indices(size, n, generator) + b * size
                for b, n in enumerate(split_evenly(n_active, target.blocks))
            ]
        )

    def masked_weight(self, index: int, target: Target, mask: Tensor) -> SparseStorage:
        """The masked storage of layer ``index`` (a :class:`rigl.storage.MaskedWeight`; a
        method that trains more than its forward set returns a
        :class:`rigl.reserve.ReservedWeight`)."""
        return MaskedWeight(target.name, target.param, mask, target.blocks, self.patterns[index])

    def observe_gradients(self) -> None:
        """Called every step before masking the gradients (SNFS keeps its EMA here)."""

    def drop_score(self, weight: SparseStorage) -> Tensor:
        """Drop score, one per active weight in flat order (see
        :meth:`rigl.seam.SparseStorage.active_values`): the smallest are dropped. Default
        ``|θ|``; a method may use anything the seam provides (e.g. ``active_gradient()``),
        and it then holds on both backends."""
        return weight.active_values().abs()

    def grow_score(self, weight: SparseStorage, generator: torch.Generator) -> RowScores:
        """Grow scores by row block (see :data:`rigl.rewiring.RowScores`)."""
        raise NotImplementedError(f"{type(self).__name__} does not grow connections")

    def plan_layer(
        self, index: int, weight: SparseStorage, step: int, generator: torch.Generator
    ) -> Rewiring | None:
        """One layer's topology change (installed by the update loop), or None to leave it
        unchanged. A method may post-process the plan (e.g. ``grown_values``)."""
        n_update = math.floor(self.schedule.fraction(step) * weight.n_active)
        if n_update == 0:
            return None
        grow = self.grow_score(weight, generator)  # first: SET draws its seed here
        return weight.rewire(n_update, self.drop_score(weight), grow, generator)

    def grown_values(
        self, index: int, weight: SparseStorage, plan: Rewiring, generator: torch.Generator
    ) -> Tensor | None:
        """Starting values of ``plan.grown`` (same order), or None for zeros (the default;
        see :class:`rigl.grow_init.GrowInit` for the official RigL code's alternatives).
        Called after :meth:`plan_layer`, with its generator, for plans that grow."""
        return plan.grown_values

    def extra_state(self) -> dict[str, Any]:
        return {}

    def check_extra_state(self, state: dict[str, Any]) -> None:
        """Raise a ConfigError if :meth:`load_extra_state` could not load ``state``;
        ``load_state_dict`` calls it before changing anything, so a refused state leaves
        the sparsifier and the model as they were."""
        del state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        del state

    # -- the training-loop API -----------------------------------------------------------
    @property
    def masks(self) -> dict[str, Tensor]:
        """{full parameter name: bool mask}."""
        return {w.name: w.mask for w in self.weights}

    # -- inspection --------------------------------------------------------------------------
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
        for handle in self._early_hooks:
            handle.remove()
        guard.release(self)
        self._removed = True

    def _check_not_removed(self) -> None:
        if self._removed:
            raise UsageError("this sparsifier was removed (remove()); create a new one")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.config.sparsity}, "
            f"distribution={self.config.distribution!r}, layers={len(self.weights)}, step={self.step_count})"
        )


def _warn_if_already_sparse(targets: list[Target], counts: list[int]) -> None:
    """A model that is already sparse (a trained sparse model loaded again) gets fresh
    random masks from ``create``, which cut its trained non-zeros: say so, with the way to
    keep its masks."""
    cut = []
    for target, count in zip(targets, counts, strict=True):
        param = target.param
        if param.is_meta or is_sharded(param) or count >= param.numel():
            continue
        nonzero = int(param.detach().count_nonzero())
        if nonzero <= param.numel() // 2 and nonzero > 0:  # a fresh init has no exact zeros
            cut.append(target.name)
    if cut:
        warn(
            f"{', '.join(cut[:3])}{' and others' if len(cut) > 3 else ''} already hold mostly "
            "exact zeros (a trained sparse model?): the new masks are drawn at random and "
            "cut its trained weights. To continue training a sparse model, load the "
            "sparsifier state saved with it (sparsifier.load_state_dict) after create()"
        )
