"""Lightning and Hugging Face callbacks: the same run as the plain loop, invariants, AMP
skips, resume. Skipped when the framework is not installed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

import rigl
from conftest import TinyMLP, assert_sparsity_invariants, batch

STEPS, BATCH = 24, 8
OPTIONS = dict(sparsity=0.8, distribution="uniform", update_interval=4, drop_fraction=0.5, seed=2)


def _data(n_steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(0, size=n_steps * BATCH)
    return x, y


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def _plain_loop(method: str = "rigl") -> rigl.Sparsifier:
    """The reference: rigl in a hand-written loop over the same batches."""
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = _optimizer(model)
    sparsifier = rigl.create(method, model, optimizer, total_steps=STEPS, **OPTIONS)
    x, y = _data()
    for t in range(STEPS):
        optimizer.zero_grad()
        xb, yb = x[t * BATCH : (t + 1) * BATCH], y[t * BATCH : (t + 1) * BATCH]
        nn.functional.cross_entropy(model(xb), yb).backward()
        sparsifier.step()
    return sparsifier


def _assert_same_run(a: rigl.Sparsifier, b: rigl.Sparsifier) -> None:
    assert (a.step_count, a.update_count) == (b.step_count, b.update_count)
    for wa, wb in zip(a.weights, b.weights, strict=True):
        assert torch.equal(wa.mask, wb.mask), wa.name
        torch.testing.assert_close(wa.param, wb.param)


# -- PyTorch Lightning -----------------------------------------------------------------------------
@pytest.fixture
def pl():
    return pytest.importorskip("lightning.pytorch")


def _lightning_module(pl, inject_inf_at: int | None = None):
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyMLP()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def on_after_backward(self) -> None:
            if self.global_step == inject_inf_at:
                self.net.fc1.weight.grad[0, 0] = float("inf")

        def configure_optimizers(self):
            return _optimizer(self)

    return Module()


def _fit(pl, module, callbacks, ckpt_path=None, max_steps=STEPS, n_batches=STEPS, **trainer_kwargs):
    x, y = _data(n_batches)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_callback_reproduces_the_plain_loop(pl):
    from rigl.integrations.lightning import RigLCallback

    callback = RigLCallback("rigl", **OPTIONS)
    _fit(pl, _lightning_module(pl), [callback])
    # names are those of the LightningModule; the run is the plain loop's, update steps
    # included (the optimizer step is skipped there by clearing the gradients)
    assert list(callback.sparsifier.masks) == ["net.fc1.weight", "net.fc2.weight", "net.out.weight"]
    assert callback.sparsifier.total_steps == STEPS
    _assert_same_run(callback.sparsifier, _plain_loop())
    assert_sparsity_invariants(callback.sparsifier)


@pytest.mark.parametrize("method", ["set", "snfs"])
def test_lightning_callback_other_methods(pl, method):
    from rigl.integrations.lightning import RigLCallback

    callback = RigLCallback(method, **OPTIONS)
    _fit(pl, _lightning_module(pl), [callback])
    _assert_same_run(callback.sparsifier, _plain_loop(method))


def test_lightning_bf16_and_accumulation_keep_invariants(pl):
    from rigl.integrations.lightning import RigLCallback

    callback = RigLCallback("rigl", **OPTIONS)
    _fit(
        pl,
        _lightning_module(pl),
        [callback],
        max_steps=STEPS // 2,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
    )
    assert callback.sparsifier.step_count == STEPS // 2
    assert callback.sparsifier.update_count == 2  # steps 4 and 8 (T_end = 0.75 * 12)
    assert_sparsity_invariants(callback.sparsifier)


def test_lightning_fp16_scaler_inf_skips_the_update(pl):
    from lightning.pytorch.plugins import MixedPrecision

    from rigl.integrations.lightning import RigLCallback

    callback = RigLCallback("rigl", **OPTIONS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    _fit(pl, _lightning_module(pl, inject_inf_at=4), [callback], plugins=[plugin])
    sparsifier = callback.sparsifier
    # the inf step (an update step) was skipped by the scaler and not counted: the update
    # ran one batch later, and the sparsifier counts one step fewer than the trainer
    assert sparsifier.step_count == STEPS - 1
    assert sparsifier.update_count == 4 and sparsifier.skipped_updates == 0
    assert scaler.get_scale() < 2.0**8
    assert_sparsity_invariants(sparsifier)


def test_lightning_checkpoint_resume_restores_masks(pl, tmp_path):
    from rigl.integrations.lightning import RigLCallback

    epoch = STEPS // 2  # two epochs; the checkpoint of the first one is resumed
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first = RigLCallback("rigl", **OPTIONS)
    _fit(pl, _lightning_module(pl), [first, saver], n_batches=epoch, enable_checkpointing=True)
    path = tmp_path / f"epoch=0-step={epoch}.ckpt"
    saved = torch.load(path, weights_only=False)

    class Probe(pl.Callback):  # what the resumed run starts from
        def on_train_start(self, trainer, module) -> None:
            self.start = {w.name: w.mask.clone() for w in resumed.sparsifier.weights}
            self.step = resumed.sparsifier.step_count
            self.weights = {n: p.detach().clone() for n, p in module.named_parameters()}

    resumed, probe = RigLCallback("rigl", **OPTIONS), Probe()
    _fit(pl, _lightning_module(pl), [resumed, probe], path, n_batches=epoch)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("RigLCallback")]
    assert probe.step == epoch == state["step"]
    for name, mask in state["masks"].items():
        assert torch.equal(probe.start[name], mask)
    for name, value in saved["state_dict"].items():  # the weights were not re-masked
        assert torch.equal(probe.weights[name], value), name
    # (Lightning does not resume its batch order exactly, so the runs are not compared)
    assert resumed.sparsifier.step_count == STEPS and resumed.sparsifier.update_count == 4
    assert_sparsity_invariants(resumed.sparsifier)


# -- Hugging Face transformers -------------------------------------------------------------------
@pytest.fixture
def hf():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers


class _Pairs(Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class _HFModel(nn.Module):
    """Any nn.Module works with the Trainer if it returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyMLP()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _hf_train(hf, out, callback, resume=None, **args):
    class InOrder(hf.Trainer):  # the plain loop's batch order
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    model = _HFModel()
    optimizer = _optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    arguments = hf.TrainingArguments(**{**settings, **args})
    trainer = InOrder(
        model=model,
        args=arguments,
        train_dataset=_Pairs(),
        optimizers=(optimizer, schedule),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_hf_callback_reproduces_the_plain_loop(hf, tmp_path):
    from rigl.integrations.huggingface import RigLTrainerCallback

    callback = RigLTrainerCallback("rigl", **OPTIONS)
    _hf_train(hf, tmp_path, callback)
    assert callback.sparsifier.total_steps == STEPS
    _assert_same_run(callback.sparsifier, _plain_loop())
    assert_sparsity_invariants(callback.sparsifier)


def test_hf_checkpoints_hold_the_masks_and_resume_exactly(hf, tmp_path):
    from rigl.integrations.huggingface import STATE_FILE, RigLTrainerCallback

    first = RigLTrainerCallback("rigl", **OPTIONS)
    _hf_train(hf, tmp_path, first, save_strategy="steps", save_steps=STEPS // 2)
    half = tmp_path / f"checkpoint-{STEPS // 2}"
    assert (half / STATE_FILE).exists()
    resumed = RigLTrainerCallback("rigl", **OPTIONS)
    _hf_train(hf, tmp_path, resumed, resume=str(half))
    _assert_same_run(resumed.sparsifier, first.sparsifier)


def test_lightning_resume_of_a_compressed_run_is_refused_clearly(pl, tmp_path):
    from rigl.integrations.lightning import RigLCallback

    epoch = STEPS // 2
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first = RigLCallback("rigl", backend="sparse", **OPTIONS)
    _fit(pl, _lightning_module(pl), [first, saver], n_batches=epoch, enable_checkpointing=True)
    path = tmp_path / f"epoch=0-step={epoch}.ckpt"
    assert path.exists()
    resumed = RigLCallback("rigl", backend="sparse", **OPTIONS)
    with pytest.raises(rigl.ConfigError, match=r"through Lightning is not supported"):
        _fit(pl, _lightning_module(pl), [resumed], path, n_batches=epoch)


def test_hf_bf16_keeps_invariants(hf, tmp_path):
    from rigl.integrations.huggingface import RigLTrainerCallback

    callback = RigLTrainerCallback("snfs", **OPTIONS)
    _hf_train(hf, tmp_path, callback, bf16=True, gradient_accumulation_steps=2)
    assert callback.sparsifier.update_count > 0
    assert_sparsity_invariants(callback.sparsifier)


def test_callbacks_reject_bad_arguments():
    from rigl.integrations import SparseTrainingHooks

    with pytest.raises(rigl.ConfigError, match="method='nope' is unknown"):
        SparseTrainingHooks("nope")
    with pytest.raises(rigl.ConfigError, match="takes the model and optimizer"):
        SparseTrainingHooks("rigl", optimizer=None)
