"""Mixed precision (bf16 autocast, GradScaler) and torch.compile with the masked backend."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import rigl
from conftest import TinyCNN, TinyMLP, assert_sparsity_invariants, batch

STEPS, INTERVAL = 12, 2


def _sparsifier(model: nn.Module, method: str = "rigl", **kwargs) -> rigl.Sparsifier:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(sparsity=0.8, distribution="uniform", total_steps=STEPS, seed=1)
    options.update(update_interval=INTERVAL, drop_fraction=0.5, **kwargs)
    return rigl.create(method, model, optimizer, **options)


def _snapshot(sparsifier: rigl.Sparsifier) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {w.name: (w.mask.clone(), w.param.detach().clone()) for w in sparsifier.weights}


# -- bf16 -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_class",
    [TinyMLP, pytest.param(TinyCNN, marks=pytest.mark.slow)],  # bf16 convs are slow on CPUs
)
def test_bf16_autocast_keeps_invariants(model_class):
    torch.manual_seed(0)
    model = model_class()
    sparsifier = _sparsifier(model)
    for t in range(STEPS):
        x, y = batch(t)
        sparsifier.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        assert all(w.param.grad.dtype == torch.float32 for w in sparsifier.weights)
        sparsifier.step()
        assert torch.isfinite(loss)
        assert_sparsity_invariants(sparsifier)
    assert sparsifier.update_count == 4 and sparsifier.skipped_updates == 0


def test_bf16_parameters_keep_invariants():
    """bf16 weights and gradients: many exact ties, still exact counts."""
    torch.manual_seed(0)
    model = TinyMLP().to(torch.bfloat16)
    sparsifier = _sparsifier(model)
    for t in range(STEPS):
        x, y = batch(t)
        sparsifier.optimizer.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        sparsifier.step()
        assert_sparsity_invariants(sparsifier)
    assert sparsifier.update_count == 4


# -- GradScaler -----------------------------------------------------------------------------------
def _scaled_backward(model, scaler, t: int, inject_inf: bool = False) -> None:
    x, y = batch(t)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if inject_inf:
        model.fc2.weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("method", ["rigl", "set", "snfs"])
def test_grad_scaler_inf_on_update_step_skips_and_does_not_count(method):
    torch.manual_seed(0)
    model = TinyMLP()
    sparsifier = _sparsifier(model, method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(INTERVAL):  # step 0 and 1: no update
        sparsifier.optimizer.zero_grad()
        _scaled_backward(model, scaler, t)
        sparsifier.step(scaler=scaler)
    assert sparsifier.should_update(sparsifier.step_count)
    before, scale = _snapshot(sparsifier), scaler.get_scale()
    extra = {k: v.clone() for k, v in getattr(sparsifier, "ema", {}).items()}
    sparsifier.optimizer.zero_grad()
    _scaled_backward(model, scaler, 2, inject_inf=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an expected scaler skip is not worth a warning
        sparsifier.step(scaler=scaler)
    # the step did not happen: weights, masks, counters and SNFS momentum untouched
    assert (sparsifier.step_count, sparsifier.update_count) == (INTERVAL, 0)
    assert sparsifier.skipped_updates == 0
    assert scaler.get_scale() == scale / 2
    for name, (mask, value) in before.items():
        weight = next(w for w in sparsifier.weights if w.name == name)
        assert torch.equal(weight.mask, mask) and torch.equal(weight.param, value), name
    for name, ema in extra.items():
        assert torch.equal(sparsifier.ema[name], ema)
    assert_sparsity_invariants(sparsifier)
    # the next finite step runs the update that was due
    sparsifier.optimizer.zero_grad()
    _scaled_backward(model, scaler, 3)
    sparsifier.step(scaler=scaler)
    assert (sparsifier.step_count, sparsifier.update_count) == (INTERVAL + 1, 1)
    assert any(s.n_grown > 0 for s in sparsifier.last_update)
    assert_sparsity_invariants(sparsifier)


def test_grad_scaler_matches_unscaled_training_and_allows_clipping():
    """Finite steps with a scaler (power-of-two scale) equal plain fp32 training; a caller
    that unscales first to clip the gradients is supported."""
    runs = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        model = TinyMLP()
        sparsifier = _sparsifier(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=use_scaler)
        for t in range(STEPS):
            sparsifier.optimizer.zero_grad()
            _scaled_backward(model, scaler, t)
            scaler.unscale_(sparsifier.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            sparsifier.step(scaler=scaler)
        runs.append(sparsifier)
    plain, scaled = runs
    assert plain.update_count == scaled.update_count == 4
    for a, b in zip(plain.weights, scaled.weights, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
        torch.testing.assert_close(a.param, b.param)


# -- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo graphs + AOT autograd, no code generation: a few seconds
        pytest.param("inductor", marks=pytest.mark.slow),  # C++ code generation: ~30 s on CPU
    ],
)
def test_compiled_model_trains_and_masks_hold(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP()
    sparsifier = _sparsifier(model)  # on the eager module; compiled code shares its parameters
    compiled = torch.compile(model, backend=backend)
    losses = []
    for t in range(STEPS):
        x, y = batch(t)
        sparsifier.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        sparsifier.step()
        losses.append(loss.item())
        assert_sparsity_invariants(sparsifier)
    assert sparsifier.update_count == 4
    x, _ = batch(99)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))  # sees the current masked weights
    assert losses[-1] < losses[0]
