"""Hugging Face ``transformers``: ``RigLTrainerCallback`` adds sparse training to a ``Trainer``.

::

    from rigl.integrations.huggingface import RigLTrainerCallback

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[RigLTrainerCallback("rigl", sparsity=0.9, update_interval=100)])
    trainer.train()

The sparsifier is built in ``on_train_begin`` from the Trainer's model and optimizer, with
``total_steps = state.max_steps`` unless given. ``on_pre_optimizer_step`` (after gradient
accumulation, DDP's all-reduce and clipping) runs :meth:`~rigl.Sparsifier.pre_optimizer_step`
and ``on_optimizer_step`` :meth:`~rigl.Sparsifier.post_optimizer_step`. The sparsifier's
state is written as ``rigl_sparsifier.pt`` into every checkpoint folder and read back when
training resumes from one. How update steps skip the optimizer step: see
:mod:`rigl.integrations`.

Logging: ``on_log`` adds ``rigl/density``, ``rigl/updates`` and ``rigl/drop_fraction`` to the
Trainer's ``logs`` (seen by the callbacks after this one) and to that entry of
``trainer.state.log_history``. The Trainer calls its own reporting callbacks (TensorBoard,
W&B, the printed log) before user callbacks; to have them report these values too, move
this callback first: ``trainer.callback_handler.callbacks.insert(0,
trainer.pop_callback(callback))``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rigl.config import ConfigError
from rigl.integrations import SparseTrainingHooks

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise ImportError(
        "rigl.integrations.huggingface needs transformers: "
        "pip install 'rigl[integrations]' (or pip install 'transformers[torch]')"
    ) from exc

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # added in transformers 4.46
    raise ImportError("rigl.integrations.huggingface needs transformers >= 4.46")

__all__ = ["STATE_FILE", "RigLTrainerCallback"]

STATE_FILE = "rigl_sparsifier.pt"


class RigLTrainerCallback(SparseTrainingHooks, TrainerCallback):
    """Sparse training with any registered method (RigL, Evci et al. 2020, by default).

    Args:
        method: a name from :func:`rigl.list_methods`.
        resume_from: a checkpoint folder (or ``rigl_sparsifier.pt`` file) to restore the
            sparsifier from; by default, when the Trainer resumes at global step ``s``,
            ``{output_dir}/checkpoint-{s}/rigl_sparsifier.pt``.
        **kwargs: arguments of :func:`rigl.create` (``sparsity``, ``update_interval``, ...).
    """

    def __init__(
        self, method: str = "rigl", resume_from: str | os.PathLike | None = None, **kwargs: Any
    ) -> None:
        SparseTrainingHooks.__init__(self, method, **kwargs)
        self.resume_from = resume_from

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = None
        if self.sparsifier is None and self._pending_state is None:
            path = self._state_path(args, state)
            if path is not None:
                folder = path.parent
                self.load_sparsifier_state(torch.load(path, map_location="cpu", weights_only=True))
        checkpoint = None if folder is None else (lambda: _checkpoint_states(folder))
        self.build(kwargs["model"], kwargs["optimizer"], state.max_steps, checkpoint)

    def _state_path(self, args: Any, state: Any) -> Path | None:
        if self.resume_from is not None:
            path = Path(self.resume_from)
            return path / STATE_FILE if path.is_dir() else path
        if state.global_step == 0:
            return None  # a fresh run
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not (folder / STATE_FILE).exists():
            raise ConfigError(
                f"resuming at step {state.global_step}, but {folder / STATE_FILE} does not "
                "exist; pass RigLTrainerCallback(resume_from=<checkpoint folder>)"
            )
        return folder / STATE_FILE

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.before_optimizer_step(kwargs["optimizer"], scaler_in_use=bool(args.fp16))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.after_optimizer_step()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        metrics = self.metrics()
        if logs is None or not metrics:
            return
        logs.update(metrics)
        # the Trainer appended a copy of ``logs`` to the history just before calling us
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.sparsifier_state(), folder / STATE_FILE)


def _checkpoint_states(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model state dict and the optimizer state dict of a Trainer checkpoint folder
    (``model.safetensors``, sharded or not, or ``pytorch_model.bin``; ``optimizer.pt``)."""
    model_state: dict[str, torch.Tensor] = {}
    index = folder / "model.safetensors.index.json"
    if index.exists() or (folder / "model.safetensors").exists():
        import json

        from safetensors.torch import load_file

        shards = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        for shard in shards:
            model_state.update(load_file(str(folder / shard)))
    elif (folder / "pytorch_model.bin").exists():
        model_state = torch.load(
            folder / "pytorch_model.bin", map_location="cpu", weights_only=True
        )
    else:
        raise ConfigError(
            f"resuming a backend='sparse' run: {folder} holds no model.safetensors or "
            "pytorch_model.bin to restore the compressed layers from"
        )
    optimizer = folder / "optimizer.pt"
    if not optimizer.exists():
        raise ConfigError(f"resuming a backend='sparse' run: {optimizer} does not exist")
    return model_state, torch.load(optimizer, map_location="cpu", weights_only=True)
