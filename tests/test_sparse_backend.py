"""The compressed backend runs the same algorithms as the masked one, with the same results."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.blockwise import blockwise_topk
from rigl.sparse import SparseLinear, kernels
from rigl.sparse import storage as sparse_storage
from rigl.sparse.convert import to_dense
from rigl.storage import NonFiniteScore
from rigl.topology import topk_indices


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def _run(
    backend, method="rigl", steps=120, optimizer="sgd", start_state=None, stop_at=None, parts=1
):
    torch.manual_seed(0)
    model = _mlp()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = rigl.create(
        method,
        model,
        opt,
        sparsity=0.85,
        total_steps=steps,
        update_interval=10,
        drop_fraction=0.4,
        backend=backend,
        seed=4,
    )
    g = torch.Generator().manual_seed(0)
    for _t in range(stop_at or steps):
        x = torch.randn(32, 64, generator=g)
        x[:, :16] = 0  # dead inputs: their gradients are exactly zero and tie
        y = torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        for part in torch.arange(32).chunk(parts):  # gradient accumulation over micro-batches
            (nn.functional.cross_entropy(model(x[part]), y[part]) / parts).backward()
        sp.step()
    return model, opt, sp


def _dense_weights(sp):
    return [
        w.layer.to_dense().weight.detach() if hasattr(w, "layer") else w.param.detach()
        for w in sp.weights
    ]


@pytest.mark.parametrize("method", ["rigl", "set", "static"])
@pytest.mark.parametrize("block_elements", [1 << 20, 1000])  # one block, and many small ones
def test_same_masks_and_weights_on_both_backends(method, block_elements, monkeypatch):
    monkeypatch.setattr(sparse_storage, "BLOCK_ELEMENTS", block_elements)
    _, _, masked = _run("masked", method, steps=300)
    model, _, sparse = _run("sparse", method, steps=300)
    assert all(isinstance(model[i], SparseLinear) for i in (0, 2, 4))
    if method != "static":
        assert sparse.update_count == masked.update_count > 15
    for k in masked.masks:
        assert torch.equal(masked.masks[k], sparse.masks[k]), k
    for a, b in zip(_dense_weights(masked), _dense_weights(sparse), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_same_masks_on_both_backends():
    _, _, masked = _run("masked", parts=2)
    _, _, sparse = _run("sparse", parts=2)
    _, _, whole = _run("sparse", parts=1)
    assert sparse.update_count == masked.update_count > 5
    for k in masked.masks:
        assert torch.equal(masked.masks[k], sparse.masks[k]), k
    # the grow scores are the accumulated gradient, not the last micro-batch's
    assert all(torch.equal(whole.masks[k], sparse.masks[k]) for k in masked.masks)


def test_grad_rows_is_the_gradient_accumulated_over_backward_calls():
    torch.manual_seed(0)
    dense = nn.Linear(24, 16)
    mask = torch.rand(16, 24) < 0.3
    layer = SparseLinear.from_dense(dense, mask)
    with torch.no_grad():
        dense.weight.mul_(mask)
    x, dy = torch.randn(3, 10, 24), torch.randn(3, 10, 16)
    layer.keep_grow_inputs(True)
    for i in range(3):
        layer(x[i]).backward(dy[i])
        dense(x[i]).backward(dy[i])
    torch.testing.assert_close(layer.grad_rows(0, 16), dense.weight.grad)
    torch.testing.assert_close(layer.grad_rows(5, 9), dense.weight.grad[5:9])
    layer.keep_grow_inputs(False)  # the kept batches are dropped
    with pytest.raises(RuntimeError, match="no kept batch"):
        layer.grad_rows(0, 16)


def _skewed_scores(kind: str, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    score = torch.rand(rows, cols, generator=g)
    if kind == "ties":
        score = (score * 8).floor()  # a mass of exact ties at the k-th value
    elif kind == "first_rows_high":
        score[: rows // 4] *= 10  # the first block's sampled guess overshoots: a rescan
    elif kind == "last_rows_high":
        score[rows // 2 :] *= 10
    elif kind == "dead_inputs":
        score[:, : cols // 3] = 0
    return score


@pytest.mark.parametrize(
    "kind", ["uniform", "ties", "first_rows_high", "last_rows_high", "dead_inputs", "kept_high"]
)
@pytest.mark.parametrize("k", [1, 300, 6000, 60000])
def test_blockwise_topk_with_sampled_cuts_equals_one_topk(kind, k):
    """Blocks of 2**16 scores: large enough for the sampled guesses (and their rescans)."""
    g = torch.Generator().manual_seed(k)
    rows, cols = 512, 512
    score = _skewed_scores(kind, rows, cols, g)
    kept = torch.sort(torch.randperm(rows * cols, generator=g)[:20000]).values
    if kind == "kept_high":  # guesses from all positions would pass too few free ones
        score.view(-1)[kept] += 10
    before = score.clone()
    masked = score.reshape(-1).clone()
    masked[kept] = -torch.inf
    expected = topk_indices(masked, k, torch.Generator().manual_seed(9))
    calls = []

    def grow(r0, r1):
        calls.append(r0)
        return score[r0:r1].reshape(-1)  # a view: must not be written

    got = blockwise_topk(
        grow, rows, cols, kept, k, torch.Generator().manual_seed(9), "w", (1 << 16) // cols
    )
    assert torch.equal(torch.sort(got).values, torch.sort(expected).values)
    assert torch.equal(score, before)
    if kind in ("uniform", "kept_high"):
        assert len(calls) == 4  # one pass over the four blocks


@pytest.mark.parametrize("use", ["torch", "cpp"])
def test_merged_plan_equals_a_sort_and_a_search_of_every_position(use):
    if use == "cpp" and kernels.extension() is None:
        pytest.skip("C++ kernels did not build")
    g = torch.Generator().manual_seed(0)
    old = torch.sort(torch.randperm(5000, generator=g)[:800]).values
    keep = torch.rand(800, generator=g) > 0.3
    dropped = old[~keep]
    fresh = torch.tensor([i for i in range(5000) if i not in set(old.tolist())])
    grown = torch.cat([dropped[::3], fresh[torch.randperm(fresh.numel(), generator=g)[:100]]])
    grown = grown[torch.randperm(grown.numel(), generator=g)]
    merged, slot = sparse_storage._merge_plan(old, keep, grown, 5000, use)
    expected = torch.sort(torch.cat([old[keep], grown])).values
    assert torch.equal(merged, expected)
    assert torch.equal(slot, sparse_storage._old_slots(old, expected))
    assert int((slot >= 0).sum()) == int(keep.sum()) + dropped[::3].numel()
    if use == "cpp":
        with pytest.raises(RuntimeError, match="overlap"):  # a grown position that was kept
            sparse_storage._merge_plan(old, keep, old[keep][:1], 5000, use)


def test_non_finite_grow_scores_are_reported():
    score = torch.rand(300, 300)
    score[200, 7] = float("nan")
    kept = torch.arange(0, 90000, 7)
    with pytest.raises(NonFiniteScore, match="non-finite scores in w"):
        blockwise_topk(
            lambda r0, r1: score[r0:r1].reshape(-1), 300, 300, kept, 50, torch.Generator(), "w", 300
        )


def test_invariants_on_the_sparse_backend_with_adam():
    _model, opt, sp = _run("sparse", "rigl", optimizer="adam")
    for weight, n in zip(sp.weights, sp.target_counts, strict=True):
        assert weight.n_active == n == weight.param.numel()
        for value in opt.state[weight.param].values():  # optimizer state is nnz-sized
            assert value.numel() in (1, n)
    # nothing dense is trained: the optimizer holds values, not dense weights
    shapes = {tuple(p.shape) for group in opt.param_groups for p in group["params"]}
    assert (48, 64) not in shapes and (32, 48) not in shapes


def test_grown_weights_start_at_zero_with_zero_state():
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = rigl.create(
        "rigl",
        model,
        opt,
        sparsity=0.85,
        total_steps=100,
        update_interval=5,
        drop_fraction=0.5,
        backend="sparse",
    )
    for _t in range(5):
        x, y = torch.randn(16, 64), torch.randint(0, 4, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    before = {w.name: set(w.layer.active_indices().tolist()) for w in sp.weights}
    x, y = torch.randn(16, 64), torch.randint(0, 4, (16,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()  # the update step (no optimizer step, as in the paper)
    for w in sp.weights:
        flat = w.layer.active_indices().tolist()
        new = torch.tensor([i not in before[w.name] for i in flat])
        assert new.any()
        assert bool((w.param[new] == 0).all())
        for value in opt.state[w.param].values():
            if value.numel() == w.n_active:
                assert bool((value[new] == 0).all())


def test_resume_is_bit_identical_on_the_sparse_backend(tmp_path):
    model, _, _sp = _run("sparse", steps=60)
    model2, opt2, sp2 = _run("sparse", steps=60, stop_at=25)
    torch.save(
        {"model": model2.state_dict(), "opt": opt2.state_dict(), "sp": sp2.state_dict()},
        tmp_path / "c.pt",
    )
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    model3, opt3, sp3 = _run("sparse", steps=60, stop_at=0)
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    sp3.load_state_dict(state["sp"])
    g = torch.Generator().manual_seed(0)
    for t in range(60):
        x = torch.randn(32, 64, generator=g)
        x[:, :16] = 0
        y = torch.randint(0, 4, (32,), generator=g)
        if t < 25:
            continue
        opt3.zero_grad()
        nn.functional.cross_entropy(model3(x), y).backward()
        sp3.step()
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)


def test_conversion_back_to_dense_keeps_the_function():
    model, _, _sp = _run("sparse", steps=30)
    x = torch.randn(8, 64)
    expected = model(x)
    to_dense(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_backend_errors():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(rigl.ConfigError, match="backend='dense-ish' is unknown"):
        rigl.create("rigl", model, opt, total_steps=1000, backend="dense-ish")
    for method in ("gmp", "snip", "snfs", "dense"):
        with pytest.raises(rigl.ConfigError, match=f"does not support method '{method}'"):
            rigl.create(method, model, opt, total_steps=1000, backend="sparse")


# -- loading a topology into a model that is training (issue 12, items 7 and 9) -------------
def _other_sparsity(backend: str, sparsity: float = 0.95) -> rigl.Sparsifier:
    torch.manual_seed(1)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return rigl.create(
        "rigl", model, opt, sparsity=sparsity, total_steps=100, update_interval=10, backend=backend
    )


def _continue(model, opt, sp, steps=12, start=40):
    g = torch.Generator().manual_seed(start)
    for _t in range(steps):
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 4, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()


def test_loading_another_sparsity_moves_the_optimizer_state_as_the_masked_backend_does(
    sparse_kernels,
):
    """The compressed layers resize their optimizer state (positions that stay active keep
    theirs, new ones start at zero): the same training as on the masked backend."""
    other = _other_sparsity("masked").state_dict()  # bool masks: loadable on both backends
    runs = {}
    for backend in ("masked", "sparse"):
        model, opt, sp = _run(backend, optimizer="adam", steps=100, stop_at=40)
        sp.load_state_dict(other)
        for weight in sp.weights:
            for value in opt.state[weight.param].values():
                assert value.dim() == 0 or value.shape == weight.param.shape
        _continue(model, opt, sp)
        runs[backend] = (sp.masks, _dense_weights(sp))
    for k in runs["masked"][0]:
        assert torch.equal(runs["masked"][0][k], runs["sparse"][0][k]), k
    for a, b in zip(runs["masked"][1], runs["sparse"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_loaded_at_the_same_sparsity_keeps_weights_and_state_in_place(sparse_kernels):
    _model, opt, sp = _run("sparse", optimizer="adam", steps=100, stop_at=30)
    values = [w.param.detach().clone() for w in sp.weights]
    states = [{k: v.clone() for k, v in opt.state[w.param].items()} for w in sp.weights]
    sp.load_state_dict(sp.state_dict())
    for w, v, s in zip(sp.weights, values, states, strict=True):
        assert torch.equal(w.param, v)
        assert all(torch.equal(opt.state[w.param][k], s[k]) for k in s)


def test_a_model_state_dict_of_another_sparsity_without_its_optimizer_state_is_refused(
    sparse_kernels,
):
    model, opt, sp = _run("sparse", optimizer="adam", steps=100, stop_at=30)
    other = _other_sparsity("sparse")
    model.load_state_dict(other.model.state_dict())  # resizes the layers; opt keeps its state
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(
        rigl.ConfigError, match=r"optimizer state of 0\.weight .*load the optimizer"
    ):
        _continue(model, opt, sp, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())  # a fresh state
    _continue(model, opt, sp, steps=2)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda t: torch.cat([t[:-1], torch.tensor([48 * 64])]), "outside"),
        (lambda t: torch.cat([torch.tensor([-1]), t[1:]]), "outside"),
        (lambda t: torch.cat([t[:-1], t[:1]]), "duplicate"),
        (lambda t: t.float(), "dtype"),
        (lambda t: t.reshape(1, -1), "1-D"),
    ],
    ids=["too_large", "negative", "duplicate", "float", "2d"],
)
def test_corrupt_indices_in_a_sparsifier_state_are_refused_before_anything_changes(bad, match):
    model, _opt, sp = _run("sparse", steps=100, stop_at=20)
    state = sp.state_dict()
    layers = list(state["masks"])
    state["masks"] = {**state["masks"], layers[0]: bad(state["masks"][layers[0]])}
    state["masks"][layers[1]] = state["masks"][layers[1]][:-5]  # valid, but another count
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(rigl.ConfigError, match=f"{layers[0]}.*{match}"):
        sp.load_state_dict(state)
    for k, v in model.state_dict().items():  # no layer was touched, not even the valid one
        assert torch.equal(v, before[k]), k
