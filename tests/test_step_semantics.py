"""What ``step()`` leaves behind: masked gradients on every path, dense layers left out of
updates, sparse embedding gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import rigl
from conftest import TinyMLP, batch, make_optimizer

SCHEDULE = {"update_interval": 2, "begin_step": 1, "end_step": 30, "decay": "constant"}


def _assert_grads_masked(sp, step):
    for weight in sp.weights:
        grad = weight.param.grad
        if grad is not None:
            grad = grad.to_dense()
            assert bool((grad[~weight.mask] == 0).all()), (step, weight.name)


def _loop(sp, model, optimizer, steps, manual=False, check=None):
    for t in range(steps):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if manual:  # the framework API: the user's own optimizer.step()
            if sp.pre_optimizer_step():
                optimizer.step()
            sp.post_optimizer_step()
        else:
            sp.step()
        if check is not None:
            check(sp, t)


# -- item 12: .grad is masked after every step -------------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("rigl", {}),  # update before the step, step skipped
        ("rigl", {"skip_optimizer_step_on_update": False}),  # update, then the step
        ("set", {}),  # step, then the update
        ("set", {"skip_optimizer_step_on_update": True}),  # update instead of the step
        ("snfs", {}),
        ("gmp", {"end_step": 10}),
        ("snip", {}),
        ("static", {}),
    ],
)
@pytest.mark.parametrize("manual", [False, True])
def test_gradient_is_masked_after_every_step(method, options, manual):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    kwargs = {**SCHEDULE, "drop_fraction": 0.5, **options}
    sp = rigl.create(method, model, None if manual else optimizer, sparsity=0.8, **kwargs)
    _loop(sp, model, optimizer, 8, manual=manual, check=_assert_grads_masked)
    assert sp.update_count >= (1 if method == "snip" else 3) or method == "static"


def test_gradient_is_masked_when_an_update_is_skipped_for_a_non_finite_gradient():
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    sp = rigl.create("rigl", model, optimizer, sparsity=0.8, **SCHEDULE)
    x, y = batch(0)
    for t in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        model.fc2.weight.grad[~sp.masks["fc2.weight"]] = float("inf")  # inactive positions
        expect = pytest.warns(UserWarning, match="skipping the topology update")
        with expect if t == 1 else contextlib.nullcontext():
            sp.step()
        _assert_grads_masked(sp, t)
    assert sp.skipped_updates == 1


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("method", ["rigl", "set"])
def test_compressed_gradient_follows_its_values(method, skip):
    """After an update the compressed layer's ``values.grad`` is in the new slot order: the
    dense view of it equals the masked backend's (masked) ``.grad`` after every step."""
    grads = {}
    for backend in ("masked", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = rigl.create(
            method,
            model,
            optimizer,
            sparsity=0.7,
            backend=backend,
            skip_optimizer_step_on_update=skip,
            drop_fraction=0.5,
            **SCHEDULE,
        )

        def record(sp, t, backend=backend):
            for w in sp.weights:
                if backend == "masked":
                    dense = w.param.grad.clone()
                else:
                    dense = torch.zeros(w.numel)
                    dense[w.layer.active_indices()] = w.param.grad
                grads[backend, t, w.name] = dense.reshape(w.shape)

        _loop(sp, model, optimizer, 6, check=record)
        assert sp.update_count == 3
    for (backend, t, name), grad in grads.items():
        if backend == "sparse":
            torch.testing.assert_close(grad, grads["masked", t, name], rtol=1e-5, atol=1e-6)


# -- item 14: a dense layer takes no part in updates ---------------------------------------------
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("rigl", {"first_layer_dense": True}),
        ("set", {"custom_sparsity": {"fc2.weight": 0.0}}),
        ("snfs", {"last_layer_dense": True}),
        ("gmp", {"first_layer_dense": True, "end_step": 10}),
        ("snip", {"first_layer_dense": True}),
    ],
)
def test_a_dense_layer_is_never_planned(method, options, monkeypatch):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    kwargs = {**SCHEDULE, "drop_fraction": 0.5, **options}
    sp = rigl.create(method, model, optimizer, sparsity=0.8, **kwargs)
    dense = [w.name for w, n in zip(sp.weights, sp.target_counts, strict=True) if n == w.numel]
    assert len(dense) == 1
    planned = []
    plan_layer = sp.plan_layer

    def spy(index, weight, step, generator):
        planned.append(weight.name)
        return plan_layer(index, weight, step, generator)

    monkeypatch.setattr(sp, "plan_layer", spy)
    stats = []
    sp.update_hooks.append(lambda s: stats.extend(s.last_update))
    _loop(sp, model, optimizer, 8)
    assert planned and dense[0] not in planned
    assert stats and all(s.n_dropped == s.n_grown == 0 for s in stats if s.name == dense[0])
    assert bool(sp.masks[dense[0]].all())


def test_a_dense_layer_gradient_does_not_stop_the_update():
    """A non-finite gradient in a layer that takes no part in updates skips nothing."""
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    sp = rigl.create("rigl", model, optimizer, sparsity=0.8, first_layer_dense=True, **SCHEDULE)
    for t in range(2):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if t == 1:  # the update step, whose optimizer step RigL skips
            model.fc1.weight.grad[0, 0] = float("nan")
        sp.step()
    assert sp.update_count == 1 and sp.skipped_updates == 0


# -- item 10: nn.Embedding(sparse=True) -----------------------------------------------------------
class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16, sparse=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 4)
        return self.fc(self.emb(tokens).mean(1))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's Adagrad, sparse path
@pytest.mark.parametrize(
    ("method", "optimizer"),
    [("set", "SGD"), ("rigl", "SGD"), ("rigl", "Adagrad"), ("snfs", "SGD"), ("rigl", "SparseAdam")],
)
def test_sparse_embedding_gradients(method, optimizer):
    torch.manual_seed(0)
    model = _Bag()
    if optimizer == "SparseAdam":  # sparse gradients only: the embedding alone
        opt = torch.optim.SparseAdam(model.emb.parameters(), lr=0.01)
        options = {"exclude": ("fc.*",)}
    else:
        kwargs = {"momentum": 0.9} if optimizer == "SGD" else {"initial_accumulator_value": 0.1}
        opt = getattr(torch.optim, optimizer)(model.parameters(), lr=0.05, **kwargs)
        options = {}
    sp = rigl.create(
        method, model, opt, sparsity=0.7, sparse_embeddings=True, drop_fraction=0.5,
        **SCHEDULE, **options,
    )  # fmt: skip
    assert "emb.weight" in sp.masks
    g = torch.Generator().manual_seed(0)
    for t in range(7):
        tokens = torch.randint(0, 40, (8, 5), generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), y).backward()
        assert model.emb.weight.grad.is_sparse
        sp.step()
        _assert_grads_masked(sp, t)
        for weight, n_active in zip(sp.weights, sp.target_counts, strict=True):
            assert int(weight.mask.sum()) == weight.n_active == n_active
            assert bool((weight.param[~weight.mask] == 0).all())
    assert sp.update_count == 3
    changed = next(s for s in sp.last_update if s.name == "emb.weight")
    assert changed.n_grown == changed.n_dropped > 0


# -- between backward() and step(): the sparse network's gradient ------------------------------
def _clipped_run(backend: str, steps: int = 30):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = rigl.create("rigl", model, optimizer, backend=backend, sparsity=0.8, total_steps=steps,
                     update_interval=5)  # fmt: skip
    g, norms, seen = torch.Generator().manual_seed(1), [], []
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        update = sp.should_update(sp.step_count)
        seen.append((update, [w.param.grad[~w.mask].abs().max() for w in sp.weights
                              if backend == "masked"]))  # fmt: skip
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
        sp.step()
    return sp, norms, seen


def test_clipping_between_backward_and_step_sees_the_same_gradient_on_both_backends():
    """The Hugging Face Trainer clips (max_grad_norm) after backward, before the optimizer
    step hooks: the masked backend used to clip by the dense gradient's norm (inactive
    entries included), the compressed one by the active gradient's, so the two trained
    different weights. Now both clip the sparse network's gradient (except on update
    steps, which keep the dense gradient for the grow scores and skip the optimizer step)."""
    masked, norms_m, seen = _clipped_run("masked")
    sparse, norms_s, _ = _clipped_run("sparse")
    assert masked.update_count == sparse.update_count > 0
    plain = [n for (update, _), n in zip(seen, norms_m, strict=True) if not update]
    assert plain == pytest.approx([n for (u, _), n in zip(seen, norms_s, strict=True) if not u])
    for update, inactive in seen:
        assert all(bool(v == 0) for v in inactive) != update  # dense only on update steps
    for a, b in zip(masked.weights, sparse.weights, strict=True):
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(a.active_values(), b.active_values(), rtol=0, atol=1e-6)


def test_methods_that_read_the_dense_gradient_every_step_still_get_it():
    """SNFS keeps an average of the dense gradient (observe_gradients in step()): its
    gradient stays dense until step()."""
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = make_optimizer("sgd", model)
    sp = rigl.create("snfs", model, optimizer, sparsity=0.8, total_steps=20, update_interval=4)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    assert any(bool((w.param.grad[~w.mask] != 0).any()) for w in sp.weights)
    sp.step()
    _assert_grads_masked(sp, 0)
