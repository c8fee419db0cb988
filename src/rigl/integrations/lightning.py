"""PyTorch Lightning: ``RigLCallback`` adds sparse training to an existing ``Trainer``.

::

    from rigl.integrations.lightning import RigLCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[RigLCallback("rigl", sparsity=0.9)])
    trainer.fit(module, data)

The sparsifier is built in ``on_fit_start`` from the LightningModule and its (single)
optimizer, with ``total_steps`` from ``trainer.estimated_stepping_batches`` unless given;
``on_before_optimizer_step`` (gradients final: accumulated, all-reduced by DDP, unscaled by
AMP) runs :meth:`~rigl.Sparsifier.pre_optimizer_step` and ``on_train_batch_end``
:meth:`~rigl.Sparsifier.post_optimizer_step`. Masks and counters are saved in Lightning
checkpoints and restored on resume. Automatic optimization only (one optimizer step per
batch, after ``accumulate_grad_batches`` micro-batches). How update steps skip the
optimizer step: see :mod:`rigl.integrations`. After each batch it logs ``rigl/density``,
``rigl/updates`` and ``rigl/drop_fraction`` with ``pl_module.log`` (to the Trainer's
loggers and ``trainer.callback_metrics``).
"""

from __future__ import annotations

import math
from typing import Any

from rigl.config import ConfigError
from rigl.integrations import SparseTrainingHooks

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "rigl.integrations.lightning needs PyTorch Lightning: "
            "pip install 'rigl[integrations]' (or pip install lightning)"
        ) from exc

__all__ = ["RigLCallback"]


class RigLCallback(SparseTrainingHooks, pl.Callback):
    """Sparse training with any registered method (RigL, Evci et al. 2020, by default).

    Args:
        method: a name from :func:`rigl.list_methods`.
        **kwargs: arguments of :func:`rigl.create` (``sparsity``, ``distribution``,
            ``update_interval``, ``drop_fraction``, ``seed``, ...).

    ``callback.sparsifier`` is the :class:`rigl.Sparsifier` once fitting has started.
    """

    def __init__(self, method: str = "rigl", **kwargs: Any) -> None:
        SparseTrainingHooks.__init__(self, method, **kwargs)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before Lightning restores a checkpoint (``fit(ckpt_path=...)``) into the model, which
        it does before ``on_fit_start``: a compressed run's checkpoint is refused clearly."""
        if stage != "fit" or self.kwargs.get("backend", "masked") != "sparse":
            return

        def refuse_compressed(module: Any, state_dict: dict, *args: Any) -> None:
            if self.sparsifier is None and any(k.endswith(".row_ptr") for k in state_dict):
                self.check_resumable("Lightning")

        pl_module.register_load_state_dict_pre_hook(refuse_compressed)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigError(
                f"RigLCallback needs exactly one optimizer, the module configured "
                f"{len(trainer.optimizers)}"
            )
        total = trainer.estimated_stepping_batches
        total_steps = int(total) if math.isfinite(total) else None
        self.build(pl_module, trainer.optimizers[0], total_steps)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.before_optimizer_step(optimizer, scaler_in_use=scaler is not None)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.after_optimizer_step()
        metrics = self.metrics()
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_sparsifier_state(state_dict)
