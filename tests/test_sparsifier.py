"""Semantics of the sparsifier: determinism, accumulation, schedulers, non-finite grads, resume."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import rigl
from conftest import TinyMLP, batch, make_optimizer, train_steps


def _run(method="rigl", seed=0, steps=20, **kwargs):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    kwargs = {"sparsity": 0.8, "total_steps": steps, "update_interval": 5, **kwargs}
    sparsifier = rigl.create(method, model, optimizer, seed=seed, **kwargs)
    train_steps(model, optimizer, sparsifier, steps)
    return model, optimizer, sparsifier


def test_masks_are_deterministic_given_the_seed():
    _, _, a = _run(seed=1)
    _, _, b = _run(seed=1)
    _, _, c = _run(seed=2)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)


def test_rigl_grows_where_the_gradient_is_largest():
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    sp = rigl.create(
        "rigl",
        model,
        optimizer,
        sparsity=0.8,
        total_steps=100,
        update_interval=1,
        begin_step=0,
        end_step=100,
        drop_fraction=0.1,
        decay="constant",
    )
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    weight = sp.weights[1]
    grad = weight.param.grad.clone()
    old = weight.mask.clone()
    sp.step()
    grown = weight.mask & ~old
    n = int(grown.sum())
    assert n > 0
    # every grown position beats every inactive position that was not grown
    candidates = ~weight.mask
    assert grad.abs()[grown].min() >= grad.abs()[candidates].max()


def test_dropped_and_regrown_weight_keeps_its_value():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create(
        "rigl",
        model,
        optimizer,
        sparsity=0.5,
        distribution="uniform",
        total_steps=10,
        update_interval=1,
        begin_step=0,
        end_step=10,
        drop_fraction=0.5,
        decay="constant",
    )
    w = sp.weights[0]
    with torch.no_grad():
        w.param.copy_(torch.tensor([[0.1, 0.0, 0.9, 0.0], [0.0, 0.2, 0.0, 0.8]]) * w.mask)
    active = w.mask.clone()
    # gradient largest exactly at the two weakest active weights: they are dropped and regrown
    grad = torch.zeros(2, 4)
    grad[active & (w.param.abs() < 0.5)] = 10.0
    w.param.grad = grad
    before = w.param.detach().clone()
    sp.step()
    assert torch.equal(w.mask, active)
    assert torch.equal(w.param.detach(), before)


def test_gradient_accumulation_uses_the_accumulated_gradient():
    def run(accumulate: bool):
        torch.manual_seed(0)
        model = TinyMLP()
        optimizer = make_optimizer("sgd", model)
        sp = rigl.create("rigl", model, optimizer, sparsity=0.8, total_steps=20, update_interval=3)
        for t in range(10):
            x, y = batch(t, size=16)
            optimizer.zero_grad()
            if accumulate:
                for part in (slice(0, 8), slice(8, 16)):
                    (nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
            else:
                nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
        return sp, model

    sp_a, model_a = run(True)
    sp_b, model_b = run(False)
    assert all(torch.equal(sp_a.masks[k], sp_b.masks[k]) for k in sp_a.masks)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_lr_scheduler_keeps_working():
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.1)
    sp = rigl.create("rigl", model, optimizer, sparsity=0.8, total_steps=20, update_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_steps(model, optimizer, sp, 13, on_step=lambda t: scheduler.step())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.01)


@pytest.mark.parametrize("method", ["rigl", "snfs", "snip"])
def test_non_finite_gradient_skips_the_update(method):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("adam", model)
    sp = rigl.create(method, model, optimizer, sparsity=0.8, total_steps=20, update_interval=5)
    update_step = 0 if method == "snip" else 5
    train_steps(model, optimizer, sp, update_step)
    masks = {k: v.clone() for k, v in sp.masks.items()}
    x, y = batch(99)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc2.weight.grad[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="skipping the topology update"):
        sp.step()
    assert sp.skipped_updates == 1
    assert sp.update_count == 0
    if method != "snip":  # SNIP keeps its dense start until a finite step
        assert all(torch.equal(masks[k], sp.masks[k]) for k in masks)
    if method != "snfs":  # RigL and SNIP also skip the optimizer step; SNFS takes it
        for w in sp.weights:
            assert torch.isfinite(w.param).all()
    else:
        assert all(torch.isfinite(v).all() for v in sp.ema.values())


@pytest.mark.parametrize("method", rigl.list_methods())
def test_resume_is_bit_identical(method, tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = TinyMLP()
        optimizer = make_optimizer("adam", model)
        sp = rigl.create(
            method, model, optimizer, sparsity=0.8, total_steps=30, update_interval=4, seed=7
        )
        return model, optimizer, sp

    model, optimizer, sp = fresh()
    train_steps(model, optimizer, sp, 30)

    model2, optimizer2, sp2 = fresh()
    train_steps(model2, optimizer2, sp2, 13)
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"model": model2.state_dict(), "opt": optimizer2.state_dict(), "sp": sp2.state_dict()}, path
    )
    del model2, optimizer2, sp2

    model3, optimizer3, sp3 = fresh()
    state = torch.load(path, weights_only=True)  # plain data only
    model3.load_state_dict(state["model"])
    optimizer3.load_state_dict(state["opt"])
    sp3.load_state_dict(state["sp"])
    train_steps(model3, optimizer3, sp3, 17, start=13)
    assert sp3.step_count == 30
    for k in sp.masks:
        assert torch.equal(sp.masks[k], sp3.masks[k])
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)


def test_skip_optimizer_step_is_an_option():
    _, _, sp = _run("rigl")
    assert sp.skip_optimizer_step_on_update
    _, _, sp2 = _run("rigl", skip_optimizer_step_on_update=False)
    assert not sp2.skip_optimizer_step_on_update
    _, _, sp3 = _run("set")
    assert not sp3.skip_optimizer_step_on_update


def test_drop_fraction_follows_the_cosine_decay():
    schedule = rigl.UpdateSchedule(update_interval=100, end_step=1000, drop_fraction=0.3)
    assert schedule.fraction(0) == pytest.approx(0.3)
    assert schedule.fraction(500) == pytest.approx(0.15)
    assert schedule.fraction(1000) == 0.0
    assert schedule.should_update(100) and not schedule.should_update(0)
    assert not schedule.should_update(150) and not schedule.should_update(1000)
    linear = rigl.UpdateSchedule(
        update_interval=10, end_step=100, drop_fraction=0.3, decay="linear"
    )
    assert linear.fraction(50) == pytest.approx(0.15)


def test_gmp_reaches_the_target_at_end_step():
    _, _, sp = _run("gmp", steps=30, end_step=20)
    assert [w.n_active for w in sp.weights] == sp.target_counts
    pruning = rigl.PruningSchedule(begin_step=0, end_step=100, update_interval=10)
    assert pruning.progress(50) == pytest.approx(1 - 0.5**3)
    assert pruning.should_update(100)


def test_summary_and_state_dict_are_plain(tmp_path):
    _, _, sp = _run("snfs")
    rows = sp.summary()
    assert [r.name for r in rows] == ["fc1.weight", "fc2.weight", "out.weight"]
    assert all(r.n_active == round(r.density * r.n_total) for r in rows)
    assert "total" in sp.summary_table()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["extra"]["ema"]) == set(sp.masks)


def test_optimizer_none_supports_manual_hooks():
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    sp = rigl.create("set", model, None, sparsity=0.8, total_steps=10, update_interval=2)
    for t in range(6):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if sp.pre_optimizer_step():
            optimizer.step()
        sp.post_optimizer_step()
    assert sp.update_count == 2
    with pytest.raises(rigl.ConfigError, match="needs the optimizer"):
        sp.step()


def test_summary_table_columns_fit_long_names(monkeypatch):
    _, _, sp = _run("static", steps=1)
    rows = [
        rigl.LayerSummary("encoder.block_with_a_rather_long_name_0.weight", (4, 3), 0.5, 6, 12),
        rigl.LayerSummary("x.weight", (1000, 300, 3, 3, 3, 1000), 0.5, 4 * 10**9, 8 * 10**9 + 1),
    ]
    monkeypatch.setattr(sp, "summary", lambda: rows)
    lines = sp.summary_table().splitlines()
    assert len(lines) == 4 and lines[1].startswith(rows[0].name + " ")
    for column in ("density", "active", "total"):  # right-aligned: every row ends there
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " and line[end : end + 1] in ("", " ") for line in lines)
    shape_start = lines[0].index("shape")
    assert lines[2][shape_start:].startswith("1000x300x3x3x3x1000 ")
    assert lines[3].endswith("8,000,000,013")


def test_warnings_point_at_the_callers_line():
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = rigl.create("rigl", model, optimizer, total_steps=10, update_interval=1000)
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]
    assert "no topology update will happen" in str(caught[0].message)
    sp.remove()  # one sparsifier per model
    sp = rigl.create("rigl", model, optimizer, total_steps=10, update_interval=2)
    x, y = batch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            model.fc2.weight.grad.fill_(float("nan"))
            sp.step()
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]
    assert "skipping the topology update" in str(caught[0].message)


def test_kernel_build_failure_warning_points_at_the_callers_line(monkeypatch):
    from rigl.sparse import SparseLinear, kernels

    def fail():
        raise RuntimeError("no compiler")

    monkeypatch.delenv("RIGL_SPARSE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_build", fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseLinear(8, 4, density=0.5)(torch.randn(2, 8))  # the first use builds the kernels
    messages = [
        str(w.message) for w in caught if "compiling the C++ kernels failed" in str(w.message)
    ]
    assert len(messages) == 1
    assert [w.filename for w in caught if str(w.message) == messages[0]] == [__file__]
