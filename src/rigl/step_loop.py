"""The training-loop half of :class:`rigl.Sparsifier`: ``step()``, the shared update loop, and
``state_dict()`` / ``load_state_dict()``.

Every step masks the gradients and the weights; on an update step every rewired layer is
planned first (:meth:`Sparsifier.plan_layer`, which returns a :class:`rigl.seam.Rewiring`)
and only then installed through the storage seam, so a non-finite score leaves all masks
as they were. A mixin: the attributes it reads are set up by ``Sparsifier._build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rigl._version import __version__
from rigl.errors import ConfigError, warn
from rigl.optim_state import check_state_sizes, unscale_found_inf
from rigl.patterns import violations as pattern_violations
from rigl.rewiring import MissingGradient, NonFiniteScore, Rewiring, check_finite
from rigl.seam import RewireStats
from rigl.sharding import check_not_resharded
from rigl.targets import check_model_names
from rigl.topology import update_generator

if TYPE_CHECKING:
    from rigl.seam import SparseStorage


class StepLoop:
    """``step()`` / ``pre_optimizer_step()`` / ``post_optimizer_step()`` and the update loop."""

    weights: list[SparseStorage]
    optimizer: torch.optim.Optimizer | None
    update_hooks: list[Any]
    dense_start: bool  # the method starts dense and prunes (GMP, GraNet): no fixed counts

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
        if unscale_found_inf(scaler, self.optimizer):
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
        check_state_sizes(self.optimizer, self.weights)
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
        self._mask_early = not update_due  # update steps keep the dense gradient (grow)

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
            plans = self._plans(step)
        except NonFiniteScore as exc:
            self._skip_update(step, exc)
            return False
        self.last_update = [
            w.install(plans[i], self.optimizer, grown_gradient=before_step)
            if plans.get(i) is not None
            else RewireStats(w.name, w.n_active, 0, 0)
            for i, w in enumerate(self.weights)
        ]
        self.update_count += 1
        for hook in self.update_hooks:
            hook(self)
        return True

    def _plans(self, step: int) -> dict[int, Rewiring | None]:
        """Every rewired layer's plan. A layer with no gradient where its method needs one
        (it took no part in this step's backward: an unused head, an expert that got no
        tokens) keeps its topology this time, with a warning; if no layer has one,
        ``backward()`` was not called: the error says so."""
        plans, missing, rewired = {}, [], self._rewired()
        for i in rewired:
            try:
                plans[i] = self._plan(i, step)
            except MissingGradient as exc:
                missing.append(exc)
        if missing and len(missing) == len(rewired):
            raise missing[0]
        if missing:
            names = ", ".join(exc.name for exc in missing)
            warn(
                f"no gradient for {names} at the topology update of step {step} (not used "
                "in this step's forward and backward?): its topology is left as it is"
            )
        return plans

    def _plan(self, index: int, step: int) -> Rewiring | None:
        """Layer ``index``'s plan: chosen by ``plan_layer``, its grown weights' starting values
        by ``grown_values`` (one generator, drawn in that order)."""
        weight, generator = self.weights[index], update_generator(self.seed, step, index)
        plan = self.plan_layer(index, weight, step, generator)
        if not isinstance(plan, Rewiring) or plan.grown.numel() == 0:
            return plan  # None, or a sharded storage's own plan (rigl.fsdp: grown at zero)
        return plan.with_values(self.grown_values(index, weight, plan, generator))

    # -- checkpoints ---------------------------------------------------------------------
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
        self._warn_other_settings(state)
        check_model_names(self.targets, state["masks"])
        masks = [w.check_topology(state["masks"][w.name]) for w in self.weights]  # all first
        self.check_loaded_patterns({w.name: m for w, m in zip(self.weights, masks, strict=True)})
        self.check_extra_state(state.get("extra", {}))  # before anything changes
        for weight, mask in zip(self.weights, masks, strict=True):
            weight.load_topology(mask, self.optimizer)  # compressed: the optimizer state too
        self.adopt_loaded_counts("the state dict")
        self.step_count = int(state["step"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.update_count = int(state.get("update_count", 0))
        self.load_extra_state(state.get("extra", {}))
        self._prepare_weights()

    def check_loaded_patterns(self, topologies: dict[str, torch.Tensor], where: str = "") -> None:
        """ConfigError naming the first layer whose loaded topology (a bool mask or flat
        positions) breaks its pattern (N:M groups, equal fan-in, whole blocks), before
        anything is loaded: it would fail at the next update, or train on with broken
        blocks. Gradual pruning (a dense start) passes through masks between patterns."""
        if self.dense_start:
            return
        for weight in self.weights:
            topology = topologies.get(weight.name)
            if topology is None or weight.pattern.kind == "unstructured":
                continue
            flat = topology.reshape(-1)
            positions = flat.nonzero().squeeze(1) if flat.dtype == torch.bool else flat
            found = pattern_violations(weight.pattern, positions.cpu(), weight.rows, weight.cols)
            if found:
                raise ConfigError(
                    f"{where}{weight.name}: the loaded topology breaks the sparsifier's pattern "
                    f"{weight.pattern} ({found[0]}); create the sparsifier with the pattern it "
                    "was saved with"
                )

    def adopt_loaded_counts(self, source: str) -> None:
        """After loading masks of other active counts (another sparsity's): the targets
        follow them, so ``check()`` and ``summary()`` describe the loaded topology (the
        budget line shows the distance from the requested sparsity); with a warning."""
        if self.dense_start:
            return
        moved = []
        self.target_counts = list(self.target_counts)  # its own list: requested_counts stays
        for i, weight in enumerate(self.weights):
            if weight.n_active != self.target_counts[i]:
                moved.append(f"{weight.name} {self.target_counts[i]} -> {weight.n_active}")
                self.target_counts[i] = weight.n_active
        if moved:
            warn(
                f"{source} holds other active counts than this sparsifier's targets; the "
                f"targets follow the loaded topology: {', '.join(moved[:4])}"
                + (" ..." if len(moved) > 4 else "")
            )

    def _warn_other_settings(self, state: dict[str, Any]) -> None:
        """A warning naming every setting (sparsity, distribution, pattern, ..., seed) in
        which the saved sparsifier differs from this one. Loading another run's masks is
        allowed (a masked run's masks into a compressed one, another sparsity's masks), but
        not silently: the masks keep the saved counts while ``summary()`` compares them with
        this sparsifier's targets, and later updates follow its settings and seed."""
        saved = dict(state.get("config") or {})
        if "seed" in state:
            saved["seed"] = state["seed"]
        here = {**self.config.to_dict(), "seed": self.seed}
        differ = [k for k in saved if k in here and _plain(saved[k]) != _plain(here[k])]
        if differ:
            pairs = ", ".join(f"{k}={saved[k]!r} (here {here[k]!r})" for k in differ)
            warn(
                f"state dict was saved by a sparsifier with {pairs}: its masks are loaded as "
                "they are (their counts stay), while summary() and later updates follow this "
                "sparsifier's settings; create it with the saved ones (state['config'], "
                "state['seed']) to resume that run exactly"
            )


def _plain(value: Any) -> Any:
    """A setting as plain comparable data: tuples as lists, mappings as dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
