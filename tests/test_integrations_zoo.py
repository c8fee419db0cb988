"""The Lightning and Hugging Face callbacks on real model families (issue 13 item 7): a GPT-2,
a BERT and a Llama-style model built from their configs, on both backends where the
compressed one applies; density, updates done and the drop fraction reach the framework's
own logger. Skipped when the framework is not installed."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from rigl.sparse.storage import SparseWeight
from zoo import CASES, B, T

STEPS = 8  # topology updates at steps 2 and 4 (T_end = 0.75 * 8)
OPTIONS = dict(sparsity=0.8, update_interval=2, drop_fraction=0.5, seed=3)
RUNS = [("gpt2", "masked"), ("bert", "masked"), ("bert", "sparse"), ("llama", "masked"),
        ("llama", "sparse")]  # fmt: skip
KEYS = ("rigl/density", "rigl/updates", "rigl/drop_fraction")


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (STEPS * B, T), generator=torch.Generator().manual_seed(0))


def _check_run(sparsifier, name: str, backend: str, prefix: str = "") -> dict[str, float]:
    """The run sparsified what the model family should, kept its invariants; returns the
    values the callback must have logged last."""
    case = CASES[name]
    assert list(sparsifier.masks) == [prefix + n for n in case.targets]
    compressed = [w.name for w in sparsifier.weights if isinstance(w, SparseWeight)]
    assert compressed == ([prefix + n for n in case.compressed] if backend == "sparse" else [])
    assert sparsifier.step_count == STEPS and sparsifier.update_count == 2
    sparsifier.check()
    active = sum(w.n_active for w in sparsifier.weights)
    total = sum(w.numel for w in sparsifier.weights)
    fraction = sparsifier.schedule.fraction(STEPS - 1)
    return {"rigl/density": active / total, "rigl/updates": 2.0, "rigl/drop_fraction": fraction}


# -- PyTorch Lightning -------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "backend"), RUNS)
def test_lightning_callback_on_transformers(name, backend, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from rigl.integrations.lightning import RigLCallback

    case = CASES[name]

    class LanguageModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = case.build()

        def training_step(self, batch, batch_idx):
            return case.loss(self.model, batch[0])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    callback = RigLCallback("rigl", backend=backend, **OPTIONS)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    loader = torch.utils.data.DataLoader(TensorDataset(_ids()), batch_size=B)
    trainer.fit(LanguageModel(), loader)
    expected = _check_run(callback.sparsifier, name, backend, prefix="model.")
    for key, value in expected.items():  # the Trainer's own metrics, and its logger's file
        assert float(trainer.callback_metrics[key]) == pytest.approx(value)
    with open(trainer.logger.log_dir + "/metrics.csv", encoding="utf-8") as file:
        rows = [r for r in csv.DictReader(file) if r.get("rigl/updates")]
    assert len(rows) == STEPS
    assert [float(r["rigl/updates"]) for r in rows] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert float(rows[-1]["rigl/density"]) == pytest.approx(expected["rigl/density"])


# -- Hugging Face transformers ---------------------------------------------------------------------
class _Tokens(Dataset):
    def __init__(self) -> None:
        self.ids = _ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize(("name", "backend"), RUNS)
def test_hf_callback_on_transformers(name, backend, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rigl.integrations.huggingface import RigLTrainerCallback

    class Probe(transformers.TrainerCallback):  # a callback after ours sees the values
        def __init__(self) -> None:
            self.seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    torch.manual_seed(0)
    model = CASES[name].build()
    callback, probe = RigLTrainerCallback("rigl", backend=backend, **OPTIONS), Probe()
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B,
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=arguments, train_dataset=_Tokens(), callbacks=[callback, probe]
    )
    trainer.train()
    expected = _check_run(callback.sparsifier, name, backend)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == STEPS
    assert [h["rigl/updates"] for h in history] == [0, 0, 1, 1, 2, 2, 2, 2]
    for key in KEYS:
        assert history[-1][key] == pytest.approx(expected[key])
        assert probe.seen[-1][key] == pytest.approx(expected[key])


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_resume_of_a_compressed_run_matches_the_uninterrupted_run(name, tmp_path):
    """The Trainer loads its checkpoint into the still dense model, which cannot hold the
    compressed values: the callback converts the layers, then restores their values and
    index from the checkpoint's model file and the optimizer state from optimizer.pt."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rigl.integrations.huggingface import RigLTrainerCallback

    def train(out, resume=None):
        torch.manual_seed(0)
        arguments = transformers.TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=B, max_steps=STEPS,
            learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="steps",
            save_steps=STEPS // 2, disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        callback = RigLTrainerCallback("rigl", backend="sparse", **OPTIONS)
        trainer = transformers.Trainer(
            model=CASES[name].build(), args=arguments, train_dataset=_Tokens(),
            callbacks=[callback],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return callback.sparsifier, trainer.model

    whole, model_a = train(tmp_path / "a")
    resumed, model_b = train(
        tmp_path / "a", resume=str(tmp_path / "a" / f"checkpoint-{STEPS // 2}")
    )
    assert resumed.step_count == whole.step_count == STEPS
    assert resumed.update_count == whole.update_count == 2
    assert any(isinstance(w, SparseWeight) for w in resumed.weights)
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)
    resumed.check()


def test_hf_resume_of_a_compressed_run_without_its_optimizer_file_is_refused(tmp_path):
    """The compressed layers' optimizer state comes from optimizer.pt: without it the run
    would go on with fresh Adam moments, so resuming says what is missing."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import rigl
    from rigl.integrations.huggingface import RigLTrainerCallback

    def train(resume=None):
        torch.manual_seed(0)
        arguments = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=B, max_steps=STEPS,
            use_cpu=True, report_to="none", save_strategy="steps", save_steps=STEPS // 2,
            disable_tqdm=True, dataloader_num_workers=0,
        )  # fmt: skip
        callback = RigLTrainerCallback("rigl", backend="sparse", **OPTIONS)
        trainer = transformers.Trainer(
            model=CASES["llama"].build(), args=arguments, train_dataset=_Tokens(),
            callbacks=[callback],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return callback

    train()
    half = tmp_path / f"checkpoint-{STEPS // 2}"
    (half / "optimizer.pt").unlink()
    with pytest.raises(rigl.ConfigError, match=r"optimizer\.pt does not exist"):
        train(resume=str(half))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_a_compressed_model_saves_a_checkpoint_from_pretrained_loads(name, tmp_path):
    """save_pretrained of a backend="sparse" model writes values and index buffers, which
    from_pretrained silently re-initialises; dense_state_dict gives the dense model's
    state dict for it, and the model stays compressed."""
    pytest.importorskip("transformers")
    import rigl
    from rigl.sparse.convert import dense_state_dict

    torch.manual_seed(0)
    model = CASES[name].build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sp = rigl.create("rigl", model, optimizer, backend="sparse", total_steps=STEPS, **OPTIONS)
    ids = _ids()[:B]
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        sp.step()
    model.eval()
    model.save_pretrained(tmp_path / "hf", state_dict=dense_state_dict(model))
    assert any(isinstance(w, SparseWeight) for w in sp.weights)  # still compressed
    loaded = type(model).from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    for weight in sp.weights:  # the zeros are there: the same sparse model
        dense = loaded.get_parameter(weight.name)
        assert int(dense.count_nonzero()) <= weight.n_active


def test_the_gpt2_example_runs(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "huggingface_gpt2_rigl.py"
    spec = importlib.util.spec_from_file_location("huggingface_gpt2_rigl", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    callback = example.main(max_steps=6, output_dir=str(tmp_path))
    assert callback.sparsifier.update_count > 0
    callback.sparsifier.check()
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn.weight" in out and "lm_head.weight" in out
