"""Bring your own model (issue 13): the model families of tests/zoo.py through the whole
pipeline. Per parameter: which tensors are sparsified, exact counts, tied tensors counted
once (dense by default), every trainable parameter in the optimizer and changing, eval and
no_grad, the invariant battery, and the same masks on both backends."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import rigl
from conftest import assert_sparsity_invariants
from rigl.sparse import SparseLinear
from rigl.sparse.storage import SparseWeight
from rigl.topology import split_evenly
from zoo import CASES, Case

STEPS = 8  # updates at steps 2 and 4 (T_end = 0.75 * 8)
OPTIONS = dict(sparsity=0.8, total_steps=STEPS, update_interval=2, drop_fraction=0.5, seed=1)


def _create(model: nn.Module, backend: str = "masked", optimizer: str = "adam", **options):
    if optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:  # SGD: float rounding differences between the backends stay small
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt2 on backend="sparse": nothing to compress
        sparsifier = rigl.create("rigl", model, optimizer, backend=backend, **OPTIONS, **options)
    return optimizer, sparsifier


def _train(case: Case, model: nn.Module, optimizer, sparsifier) -> None:
    model.train()
    for t in range(STEPS):
        optimizer.zero_grad()
        case.loss(model, case.batch(t)).backward()
        sparsifier.step()


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build()


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_zoo_battery(case, backend):
    model = _build(case)
    optimizer, sparsifier = _create(model, backend)
    # which tensors, and which backend each got
    assert [w.name for w in sparsifier.weights] == case.targets
    compressed = [w.name for w in sparsifier.weights if isinstance(w, SparseWeight)]
    assert compressed == (case.compressed if backend == "sparse" else [])
    for row in sparsifier.summary():
        assert row.backend == ("sparse" if row.name in compressed else "masked")
        assert backend == "masked" or row.backend == "sparse" or row.note  # says why
    # exact counts; a shared tensor is one target, counted once
    assert [w.n_active for w in sparsifier.weights] == sparsifier.target_counts
    assert len({id(w.param) for w in sparsifier.weights}) == len(sparsifier.weights)
    for w in sparsifier.weights:
        if w.blocks > 1:  # packed q/k/v: each block keeps its own count
            per_block = w.mask.reshape(w.blocks, -1).sum(1).tolist()
            assert per_block == split_evenly(w.n_active, w.blocks), w.name
    if case.tied:
        assert not set(case.tied) & set(sparsifier.masks)  # the embedding rule: dense
        assert case.tied[0] in sparsifier.summary_table()
    # every trainable parameter is in the optimizer, and all of them train
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert set(trainable) <= in_optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(case, model, optimizer, sparsifier)
    assert sparsifier.update_count == 2
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    # the invariants, and eval / no_grad
    sparsifier.check()
    assert_sparsity_invariants(sparsifier)
    batch = case.batch(99)
    with torch.no_grad():
        train_mode = _logits(model, batch)
        model.eval()
        eval_mode = _logits(model, batch)
    assert torch.isfinite(eval_mode).all()
    if not case.image:  # no dropout, no batch norm: the same function in both modes
        torch.testing.assert_close(eval_mode, train_mode, rtol=1e-4, atol=1e-5)


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return getattr(out, "logits", out)


def test_both_backends_give_the_same_masks(case):
    if not case.compressed:
        pytest.skip("nothing is compressed: both backends are the masked one")
    runs = {}
    for backend in ("masked", "sparse"):
        model = _build(case)
        optimizer, sparsifier = _create(model, backend, "sgd")
        _train(case, model, optimizer, sparsifier)
        runs[backend] = sparsifier
    masked, sparse = runs["masked"], runs["sparse"]
    assert masked.update_count == sparse.update_count == 2
    for name, mask in masked.masks.items():
        assert torch.equal(mask, sparse.masks[name]), name
    for a, b in zip(masked.weights, sparse.weights, strict=True):
        if isinstance(b, SparseWeight):
            torch.testing.assert_close(
                a.param.detach(), b.layer.weight.detach(), atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("name", ["gpt2", "bert", "nanogpt"])
def test_tied_embedding_is_one_target_with_sparse_embeddings(name):
    case = CASES[name]
    embedding, head = case.tied
    model = _build(case)
    optimizer, sparsifier = _create(model, "sparse", sparse_embeddings=True)
    rows = {row.name: row for row in sparsifier.summary()}
    assert embedding in rows and head not in rows  # one mask, one count
    assert rows[embedding].backend == "masked" and "tied" in rows[embedding].note
    assert head in rows[embedding].note  # the summary names the tie
    tied = model.get_parameter(embedding)
    assert tied is model.get_parameter(head)  # never untied
    assert rows[embedding].n_total == tied.numel()  # counted once in the budget
    active, total = (sum(getattr(r, k) for r in rows.values()) for k in ("n_active", "n_total"))
    assert abs(active - 0.2 * total) <= len(rows)  # the budget is met over distinct tensors
    before = tied.detach().clone()
    _train(case, model, optimizer, sparsifier)
    assert not torch.equal(tied, before)
    sparsifier.check()


def test_tied_embedding_follows_the_embedding_rule_in_either_order():
    """Which of the two modules is visited first does not matter."""

    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 20, bias=False)
            self.body = nn.Linear(8, 8)
            self.emb = nn.Embedding(20, 8)
            self.emb.weight = self.head.weight

    both = ["head.weight", "body.weight"]
    for options, expected in (
        ({}, ["body.weight"]),
        ({"sparse_embeddings": True}, both),
        ({"include": ("emb.weight",)}, both),  # naming either name of the tensor
    ):
        assert list(rigl.layer_densities(HeadFirst(), 0.9, "erk", **options)) == expected


# -- the compressed backend keeps what it cannot convert masked, and says why ----------------------
def test_a_model_that_is_one_linear_trains_masked_on_the_sparse_backend():
    torch.manual_seed(0)
    model = nn.Linear(12, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="compresses none"):
        sparsifier = rigl.create("rigl", model, optimizer, backend="sparse", **OPTIONS)
    (row,) = sparsifier.summary()
    assert row.backend == "masked" and "the model is this nn.Linear" in row.note
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(8, 12)).square().mean().backward()
        sparsifier.step()
    assert sparsifier.update_count == 2
    assert int((model.weight != 0).sum()) <= sparsifier.target_counts[0]
    sparsifier.check()


def test_a_module_used_twice_stays_one_masked_layer():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Twice()
    optimizer, sparsifier = _create(model, "sparse")
    rows = {row.name: row for row in sparsifier.summary()}
    assert list(rows) == ["a.weight", "out.weight"]
    assert rows["a.weight"].backend == "masked" and "b.weight" in rows["a.weight"].note
    assert model.a is model.b and isinstance(model.out, SparseLinear)
    before = model.a.weight.detach().clone()
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(torch.randn(8, 8)).square().mean().backward()
        sparsifier.step()
    assert not torch.equal(model.a.weight, before)  # in the optimizer, trained
    sparsifier.check()


# -- SparseLinear reads like nn.Linear ------------------------------------------------------------
def test_sparse_linear_is_a_drop_in_for_code_that_reads_a_linear():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, density=0.25)
    assert (layer.in_features, layer.out_features) == (16, 8)
    assert repr(layer).startswith("SparseLinear(in_features=16, out_features=8, bias=True")
    weight = layer.weight  # a dense view, built on demand
    assert weight.shape == (8, 16) and int((weight != 0).sum()) == layer.n_active
    torch.testing.assert_close(weight, layer.to_dense().weight)
    x = torch.randn(5, 16)
    functional = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(functional, layer(x))
    # computing with the view trains the values, as the layer itself does
    (grad_view,) = torch.autograd.grad(functional.square().sum(), layer.values)
    (grad_layer,) = torch.autograd.grad(layer(x).square().sum(), layer.values)
    torch.testing.assert_close(grad_view, grad_layer)
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(8, 16))


def test_hf_helpers_work_on_the_compressed_backend():
    case = CASES["llama"]
    model = _build(case)
    optimizer, sparsifier = _create(model, "sparse")
    _train(case, model, optimizer, sparsifier)
    head = model.get_output_embeddings()
    assert isinstance(head, SparseLinear) and head.weight.shape == (100, 32)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    model.eval()
    out = model.generate(case.batch(0)[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 7)


def test_transformer_encoder_fast_path_reads_sparse_layers():
    """eval + no_grad takes PyTorch's fused encoder path, which reads ``linear1.weight``."""
    case = CASES["encoder"]
    model = _build(case)
    optimizer, sparsifier = _create(model, "sparse")
    _train(case, model, optimizer, sparsifier)
    batch = case.batch(7)
    with torch.no_grad():
        slow = model(batch)
        model.eval()
        calls = []
        hook = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: calls.append(type(m).__name__)
        )
        try:
            fast = model(batch)
        finally:
            hook.remove()
    # the head only: the encoder layers ran fused, on the dense views of their weights
    assert calls.count("TransformerEncoderLayer") == 2 and calls.count("SparseLinear") == 1
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_layer_densities_match_the_sparsifier_counts(case):
    """The budget and FLOPs see each tensor once, blocks included."""
    model = _build(case)
    densities = rigl.layer_densities(model, 0.8, "erk")
    _, sparsifier = _create(model)
    for w, n in zip(sparsifier.weights, sparsifier.target_counts, strict=True):
        assert densities[w.name] == n / math.prod(w.shape)
