"""Sparse training inside training frameworks that call ``optimizer.step()`` themselves.

- :mod:`rigl.integrations.lightning`: ``RigLCallback`` for PyTorch Lightning.
- :mod:`rigl.integrations.huggingface`: ``RigLTrainerCallback`` for ``transformers.Trainer``.

Both drive the sparsifier through :meth:`~rigl.Sparsifier.pre_optimizer_step` (just before
the framework's optimizer step) and :meth:`~rigl.Sparsifier.post_optimizer_step` (just
after it), so any registered method works.

Skipping the optimizer step on update steps (RigL's default, as in the paper): a callback
cannot stop the framework from calling ``optimizer.step()``, so on such a step it sets
every gradient of the optimizer to ``None``. ``torch.optim`` optimizers skip parameters
whose ``.grad`` is None altogether (no momentum, no weight decay, no Adam step count; see
``Optimizer.zero_grad``), so the step is a no-op, while the LR scheduler still advances, as
the paper's global step does. Optimizers that update parameters without a gradient
(some third-party ones) need ``skip_optimizer_step_on_update=False``: the topology update
then comes first and the step is taken with the new masks.

Mixed precision with a GradScaler (fp16): when a gradient is inf/NaN the framework's
scaler skips the optimizer step; the callback skips that step too (no topology update,
nothing counted), as ``sparsifier.step(scaler=...)`` does in a plain loop.

Logging: after every optimizer step the callbacks report :meth:`SparseTrainingHooks.metrics`
(``rigl/density``, ``rigl/updates``, ``rigl/drop_fraction``) to the framework's own logger:
Lightning's ``pl_module.log``, the Hugging Face ``logs`` of ``on_log``.

This package imports no framework; each submodule imports its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import rigl
from rigl.config import ConfigError
from rigl.sparsifier import Sparsifier


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient of ``optimizer`` is finite (what a GradScaler tests)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    checks = [torch.isfinite(g).all() for g in grads if g is not None]
    return not checks or bool(torch.stack(checks).all())


def skip_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming ``optimizer.step()`` a no-op: torch optimizers skip parameters whose
    ``.grad`` is None."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


_WRAPPERS = ("accelerate.", "lightning.", "pytorch_lightning.")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``); any other optimizer is returned as it is."""
    while type(optimizer).__module__.startswith(_WRAPPERS) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class SparseTrainingHooks:
    """The framework-independent part of the callbacks: build the sparsifier when the
    framework has its model and optimizer, call the step hooks, save and restore state.

    Args:
        method: a name from :func:`rigl.list_methods`.
        **kwargs: arguments of :func:`rigl.create` (``sparsity``, ``update_interval``, ...);
            ``total_steps`` defaults to the framework's number of optimizer steps.
    """

    def __init__(self, method: str = "rigl", **kwargs: Any) -> None:
        rigl.get_method(method)  # fail early on an unknown name
        if "optimizer" in kwargs or "model" in kwargs:
            raise ConfigError("the callback takes the model and optimizer from the framework")
        self.method = method
        self.kwargs = kwargs
        self.sparsifier: Sparsifier | None = None
        self._pending_state: dict[str, Any] | None = None
        self._stepping = False  # between pre_optimizer_step and post_optimizer_step

    def build(
        self,
        model: nn.Module,
        optimizer: Any,
        total_steps: int | None,
        checkpoint: Any = None,
    ) -> Sparsifier:
        """Create the sparsifier (once); a state restored earlier is loaded into it.

        ``checkpoint`` (resuming a ``backend="sparse"`` run): a function returning the
        checkpoint's model state dict and its optimizer state dict, read after the layers
        are converted (the framework loaded them into the dense layers, which cannot hold
        the compressed values)."""
        if self.sparsifier is not None:
            return self.sparsifier
        kwargs = dict(self.kwargs)
        if kwargs.get("total_steps") is None and total_steps is not None and total_steps > 0:
            kwargs["total_steps"] = int(total_steps)
        # creating a sparsifier masks the weights with fresh initial masks: keep the values
        # of a resumed model and re-mask them with the saved masks instead
        saved = None
        if self._pending_state is not None:
            saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        torch_optimizer = unwrap_optimizer(optimizer)
        self.sparsifier = rigl.create(self.method, model, torch_optimizer, **kwargs)
        if saved is not None:
            self._load(saved, torch_optimizer, checkpoint)
        return self.sparsifier

    @torch.no_grad()
    def _load(self, saved: dict[str, torch.Tensor], optimizer: Any, checkpoint: Any) -> None:
        """Put the resumed values back, then the saved masks (which they already respect).
        Compressed layers (new parameters, ``values``) take theirs from ``checkpoint``,
        and the optimizer its state again: converting dropped the state of the dense
        weights, which the framework had loaded the compressed values' state into."""
        assert self.sparsifier is not None and self._pending_state is not None
        model = self.sparsifier.model
        compressed = [n for n, _ in model.named_parameters() if n not in saved]
        if compressed and checkpoint is None:
            self.check_resumable("this framework")
        optimizer_state = None
        if compressed:
            model_state, optimizer_state = checkpoint()
            layers = {n.rpartition(".")[0] for n in compressed}
            mine = {k: v for k, v in model_state.items() if k.rpartition(".")[0] in layers}
            missing = [n for n in compressed if n not in mine]
            if missing:
                raise ConfigError(
                    f"resuming a backend='sparse' run: the checkpoint has no {missing[:3]}; "
                    "it was not saved from a backend='sparse' run with these settings"
                )
            model.load_state_dict(mine, strict=False)  # index checked, then values
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])
        self.sparsifier.load_state_dict(self._pending_state)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        self._pending_state = None

    def check_resumable(self, framework: str) -> None:
        """ConfigError before a framework that cannot hand over its checkpoint (Lightning
        loads it strictly into the dense model first) resumes a ``backend="sparse"`` run:
        the compressed layers' values would not be restored, and resuming is refused
        instead of training on fresh weights. The Hugging Face callback reads them from the
        checkpoint folder instead (``build(checkpoint=...)``)."""
        if self.kwargs.get("backend", "masked") == "sparse":
            raise ConfigError(
                f"resuming a backend='sparse' run through {framework} is not supported: "
                f"{framework} loads the checkpoint into the model before the callback "
                "converts its layers, so their values would be lost. Train with "
                "backend='masked' to resume through the framework, or resume a plain loop "
                "from model.state_dict() and sparsifier.state_dict() (README: 'Data "
                "parallel, mixed precision, frameworks')"
            )

    # -- around the framework's optimizer step ---------------------------------------------
    def before_optimizer_step(self, optimizer: Any, *, scaler_in_use: bool) -> None:
        """Just before ``optimizer.step()``, gradients final (synced, unscaled or not)."""
        if self.sparsifier is None:
            raise RuntimeError("the sparsifier was not built: the training did not start")
        if scaler_in_use and not grads_finite(self.sparsifier.optimizer):
            return  # the scaler skips this step; so do we (nothing is counted)
        self._stepping = True
        if not self.sparsifier.pre_optimizer_step():
            skip_optimizer_step(unwrap_optimizer(optimizer))

    def after_optimizer_step(self) -> None:
        if self._stepping and self.sparsifier is not None:
            self._stepping = False
            self.sparsifier.post_optimizer_step()

    def metrics(self) -> dict[str, float]:
        """What the callbacks log: the density of the sparsified tensors (active / total),
        the topology updates done, and the drop fraction f_decay(t) of the last step taken
        (0 for methods without an update schedule, e.g. static, gmp)."""
        sparsifier = self.sparsifier
        if sparsifier is None:
            return {}
        active = sum(w.n_active for w in sparsifier.weights)
        total = sum(w.numel for w in sparsifier.weights)
        schedule, step = sparsifier.schedule, sparsifier.step_count - 1
        fraction = schedule.fraction(step) if hasattr(schedule, "fraction") and step >= 0 else 0.0
        return {
            "rigl/density": active / total,
            "rigl/updates": float(sparsifier.update_count),
            "rigl/drop_fraction": float(fraction),
        }

    # -- checkpoints -----------------------------------------------------------------------
    def sparsifier_state(self) -> dict[str, Any]:
        if self.sparsifier is not None:
            return self.sparsifier.state_dict()
        return self._pending_state or {}

    def load_sparsifier_state(self, state: dict[str, Any]) -> None:
        """Restore now, or when the sparsifier is built if the training has not started."""
        if not state:
            return
        if self.sparsifier is None:
            self._pending_state = state
        else:  # the framework restored the (masked) weights already
            self.sparsifier.load_state_dict(state)
