"""The character-level language model: the pydoc corpus, CharGPT and `rigl train` on it."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

import rigl
from conftest import tiny_run_config
from rigl.experiments.data.datasets import PYDOC_SHA256, load_dataset, pydoc_topics_text
from rigl.experiments.models.char_gpt import CharGPT


def test_pydoc_corpus_is_the_pinned_one_with_next_character_targets():
    text = pydoc_topics_text()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    data = load_dataset("pydoc", seq_len=32)
    assert data.info["sha256"] == digest
    if digest not in PYDOC_SHA256:  # another Python release: warned, still usable
        pytest.skip(f"Python {sys.version.split()[0]} ships other help topics")
    vocab = data.info["vocab"]
    assert data.num_classes == len(vocab) == len(set(text)) == 103
    x, y = data.train.tensors
    assert x.shape[1:] == y.shape[1:] == (32,) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # target[t] = input[t + 1]
    first = "".join(vocab[int(i)] for i in x[0])
    assert first == text[:32]
    # the test text is the last 10%, after every training window
    xt, _ = data.test.tensors
    cut = int(0.9 * len(text))
    assert "".join(vocab[int(i)] for i in xt[0]) == text[cut : cut + 32]
    assert len(x) == math.ceil((cut - 32) / 32)  # non-overlapping windows, each with a target


def test_a_changed_corpus_is_warned_about(monkeypatch):
    monkeypatch.setattr("rigl.experiments.data.datasets.PYDOC_SHA256", {"0" * 64: "none"})
    with pytest.warns(UserWarning, match="differs from the pinned corpus"):
        load_dataset("pydoc", seq_len=16)


def _model(**kw) -> CharGPT:
    torch.manual_seed(0)
    args = {"vocab": 11, "context": 16, "d_model": 32, "n_layer": 2, "n_head": 4, "mlp_ratio": 4}
    return CharGPT(**{**args, **kw})


def test_char_gpt_is_causal_and_its_readout_is_the_embedding():
    model = _model().eval()
    tokens = torch.randint(0, 11, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 11
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 16, 11)
    assert torch.equal(a[:, :10], b[:, :10])  # nothing before position 10 sees it
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.head.weight is model.embedding.weight
    with pytest.raises(ValueError, match="longer than the context 16"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_rigl_on_char_gpt_keeps_exact_counts_and_trains_every_parameter():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = rigl.create("rigl", model, opt, sparsity=0.9, total_steps=40, update_interval=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randint(0, 11, (4, 16), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(x).reshape(-1, 11), x.roll(-1, 1).reshape(-1)
        ).backward()
        sp.step()
    assert sp.update_count >= 2
    for w, n in zip(sp.weights, sp.target_counts, strict=True):
        assert int(w.mask.sum()) == n, w.name
        assert bool((w.param[~w.mask] == 0).all()), w.name
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "frozen"


def test_rigl_train_on_the_language_model_reports_bits_per_character(tmp_path):
    config = tiny_run_config(
        tmp_path, tmp_path, dataset="pydoc", dataset_options={"seq_len": 32},
        model="char_gpt", model_options={"d_model": 16, "n_layer": 1, "n_head": 2},
        steps=12, batch_size=8, update_interval=4, optimizer="adam", lr=0.01,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "rigl.cli", "train", "--quiet", "--config", str(config)]
    subprocess.run(cmd, check=True)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["test_bpc"] == pytest.approx(final["test_loss"] / math.log(2))
    assert final["test_bpc"] < math.log2(103) + 1  # a real number, near a uniform guess


def test_a_sweep_of_language_models_is_tabled_and_plotted_in_bits_per_character(tmp_path):
    from rigl.experiments.sweeps import plots, results

    def record(method, sparsity, seed, bpc):
        return {
            "row": method, "method": method, "distribution": "erk", "multiplier": 1,
            "sparsity": sparsity, "seed": seed, "test_accuracy": 0.5, "test_bpc": bpc,
            "train_flops_ratio": 1.0 - sparsity, "inference_flops_ratio": 1.0 - sparsity,
            "params": 10,
        }  # fmt: skip

    records = [record("dense", 0, s, 2.0 + s / 10) for s in (0, 1)]
    records += [record("rigl", 0.9, s, 2.5 + s / 10) for s in (0, 1)]
    metric = results.metric_of(records)
    assert metric is results.BPC
    assert results.metric_of([{**records[0], "test_bpc": None}]) is results.ACCURACY
    rows = results.summarise(records, [0.9])
    table = results.markdown(rows, [0.9], metric)
    assert "test bits/char at 90%" in table
    assert "| dense | 2.050 ± 0.071 |" in table and "| rigl | 2.550 ± 0.071 |" in table
    paths = plots.plot_all(records, rows, [0.9], tmp_path, metric)
    assert [p.name for p in paths] == ["bpc_vs_sparsity.png", "bpc_vs_train_flops.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
