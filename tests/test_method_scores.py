"""Golden tests of the newer methods' scores and plans on tiny tensors (hand-computed), on
both backends where the method runs on both, and of the grow initialisations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.grow_init import draw_values, parse_grow_init
from rigl.sparse.storage import SparseWeight


def _one_layer(method, backend="masked", n_in=4, n_out=2, **options):
    """A sparsifier over one bias-free Linear (out, in) and its storage."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n_in, n_out, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options.setdefault("total_steps", 10)
    options.setdefault("update_interval", 2)
    sparsifier = rigl.create(method, model, optimizer, backend=backend, seed=1, **options)
    return sparsifier, sparsifier.weights[0]


def _set_active(weight, values, grads):
    """Write values and gradient of the active weights, in flat order."""
    values, grads = torch.tensor(values), torch.tensor(grads)
    flat = weight.active_positions()
    with torch.no_grad():
        if isinstance(weight, SparseWeight):
            weight.param.copy_(values)
            weight.param.grad = grads.clone()
        else:
            weight.param.zero_()
            weight.param.view(-1)[flat] = values
            weight.param.grad = torch.zeros_like(weight.param)
            weight.param.grad.view(-1)[flat] = grads


# |θ| = [0.5, 0.1, 0.2, 0.4], |∇θ| = [0, 0.35, 0.05, 0.01]
VALUES, GRADS = [0.5, -0.1, 0.2, -0.4], [0.0, 0.35, -0.05, 0.01]


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize(
    ("drop_lambda", "score", "dropped"),
    [
        (1.0, [0.5, 0.45, 0.25, 0.41], [2, 3]),  # the gradient saves the small weight 1
        (0.0, [0.5, 0.1, 0.2, 0.4], [1, 2]),  # SET: the two smallest magnitudes
        (10.0, [0.5, 3.6, 0.7, 0.5], [0, 3]),  # the tie 0.5 / 0.5 goes to both
    ],
)
def test_mest_drops_by_magnitude_plus_lambda_times_gradient(backend, drop_lambda, score, dropped):
    options = {"sparsity": 0.5, "distribution": "uniform", "drop_fraction": 0.5}
    sparsifier, weight = _one_layer(
        "mest", backend, drop_lambda=drop_lambda, decay="constant", **options
    )
    assert weight.n_active == 4 and isinstance(weight, SparseWeight) == (backend == "sparse")
    _set_active(weight, VALUES, GRADS)
    torch.testing.assert_close(sparsifier.drop_score(weight), torch.tensor(score))
    plan = sparsifier.plan_layer(0, weight, 1, torch.Generator().manual_seed(0))
    assert (~plan.keep).nonzero().squeeze(1).tolist() == dropped
    assert plan.grown.numel() == 2  # SET's random growth, as many as dropped


def test_mest_rejects_a_negative_lambda():
    with pytest.raises(rigl.ConfigError, match="drop_lambda=-1"):
        _one_layer("mest", drop_lambda=-1)


def _granet(**options):
    """GraNet on one 1x8 layer: final 4 active, updates at steps 0, 2 and 4 (end)."""
    return _one_layer(
        "granet",
        n_in=8,
        n_out=1,
        sparsity=0.5,
        distribution="uniform",
        total_steps=10,
        begin_step=0,
        end_step=4,
        update_interval=2,
        drop_fraction=0.4,
        decay="constant",
        **options,
    )


def test_granet_prunes_to_the_cubic_count_then_regrows_by_gradient():
    sparsifier, weight = _granet()
    assert weight.n_active == 8  # dense start
    values = [0.8, -0.1, 0.3, 0.05, -0.6, 0.2, 0.7, -0.02]
    grads = [0.0, 0.9, 0.1, 0.05, 0.0, 0.2, 0.0, 0.5]
    _set_active(weight, values, grads)
    # step 2: p = 1 - (1 - 2/4)^3 = 0.875, zeros floor(0.875 * 4) = 3, so 5 are kept:
    # positions 0, 2, 4, 5, 6 (7, 3 and 1 have the smallest |θ|); then floor(0.4 * 5) = 2
    # of them are dropped (5 and 2, |θ| 0.2 and 0.3) and 2 grow where |∇| is largest among
    # the 5 positions not kept: 1 (0.9) and 7 (0.5).
    plan = sparsifier.plan_layer(0, weight, 2, torch.Generator().manual_seed(0))
    assert weight.active_positions()[plan.keep].tolist() == [0, 4, 6]
    assert sorted(plan.grown.tolist()) == [1, 7]
    # step 4 (the end): the final count 4; no regrowth at or after end_step (f = 0)
    plan = sparsifier.plan_layer(0, weight, 4, torch.Generator().manual_seed(0))
    assert weight.active_positions()[plan.keep].tolist() == [0, 2, 4, 6]
    assert plan.grown.numel() == 0


def test_granet_from_a_sparse_start_prunes_from_its_initial_count():
    sparsifier, weight = _granet(initial_sparsity=0.25)
    assert weight.n_active == 6 and sparsifier.initial_counts() == [6]
    # zeros go from 2 to 4: at step 2, 8 - floor(2 + 0.875 * 2) = 5 are kept
    _set_active(weight, [0.6, -0.5, 0.4, 0.3, 0.2, 0.1], [0.0] * 6)
    plan = sparsifier.plan_layer(0, weight, 2, torch.Generator().manual_seed(0))
    assert plan.n_kept + plan.grown.numel() == 5
    with pytest.raises(rigl.ConfigError, match="initial_sparsity=0.6 is above sparsity=0.5"):
        _granet(initial_sparsity=0.6)
    with pytest.raises(rigl.ConfigError, match="backend='sparse' does not support method"):
        _granet(backend="sparse")


def test_granet_training_flops_are_rigls_formula_on_the_pruning_average():
    """From dense with the default schedule facts, ``f̄ = f_D - r (f_D - f_S)``; at f_S =
    f_D it is dense training, and a sparse start costs less than a dense one."""
    f_s, f_d, dt = 0.2, 1.0, 100
    r = rigl.flops_train.pruning_flops_fraction()
    f_mean = f_d - r * (f_d - f_s)
    expected = (3 * f_mean * dt + 2 * f_mean + f_d) / (dt + 1) / (3 * f_d)
    assert rigl.train_flops_ratio("granet", f_s, f_d, update_interval=dt) == pytest.approx(expected)
    half = rigl.train_flops_ratio("granet", f_s, f_d, initial_sparsity_fraction=0.5)
    assert half < rigl.train_flops_ratio("granet", f_s, f_d)
    assert rigl.train_flops_ratio("granet", f_s, f_d) > rigl.train_flops_ratio("gmp", f_s, f_d)


# -- grow initialisation -------------------------------------------------------------------
def test_grow_init_names_and_divisors():
    assert parse_grow_init("zeros") == ("zeros", 1.0)
    assert parse_grow_init("random_normal_2") == ("random_normal", 2.0)
    assert parse_grow_init("initial_dist_.5") == ("initial_dist", 0.5)
    for bad in ("gaussian", "random_normal_0", "random_normal_-1", "zeros_", None):
        with pytest.raises(rigl.ConfigError, match="grow_init=.* is unknown; allowed: zeros"):
            parse_grow_init(bad)


def test_grow_init_draws_follow_the_layers_statistics():
    g = torch.Generator().manual_seed(0)
    current = torch.tensor([1.0, -1.0, 1.0, -1.0])  # std 1, mean |θ| 1
    normal = draw_values("random_normal", 20_000, current * 0.5, None, g)
    assert float(normal.std()) == pytest.approx(0.5, rel=0.03)
    uniform = draw_values("random_uniform", 20_000, current * 0.3, None, g)
    assert float(uniform.abs().max()) <= 0.3 and float(uniform.abs().max()) > 0.29
    assert float(uniform.mean()) == pytest.approx(0.0, abs=0.01)
    initial = torch.tensor([0.7, -0.2, 0.4, 0.9])
    drawn = draw_values("initial_dist", 3, current, initial, g)
    assert len(set(drawn.tolist())) == 3 and set(drawn.tolist()) <= set(initial.tolist())
    assert torch.equal(draw_values("zeros", 2, current, None, g), torch.zeros(2))


@pytest.mark.parametrize("grow_init", ["random_normal", "random_uniform_2", "initial_dist"])
def test_grown_weights_start_at_their_grow_init_values_on_both_backends(grow_init):
    """One SET update on a 6x10 layer: the grown weights hold values (not zero), with
    fresh optimizer state, the same on the masked and the compressed backend."""
    grown = {}
    for backend in ("masked", "sparse"):
        options = {"sparsity": 0.6, "distribution": "uniform", "total_steps": 8}
        sparsifier, weight = _one_layer(
            "set", backend, n_in=10, n_out=6, update_interval=2, grow_init=grow_init, **options
        )
        model = sparsifier.model
        initial = weight.active_values().clone()
        before = weight.active_positions().clone()
        for t in range(3):  # the update comes after step 2's optimizer step
            model.zero_grad()
            model(torch.randn(4, 10, generator=torch.Generator().manual_seed(t))).sum().backward()
            sparsifier.step()
        new = ~torch.isin(weight.active_positions(), before)
        assert new.any()
        values = weight.active_values()[new]
        assert bool((values != 0).all())
        if grow_init == "initial_dist":
            assert set(values.tolist()) <= set(initial.tolist())
        grown[backend] = (weight.active_positions()[new], values)
    assert torch.equal(grown["masked"][0], grown["sparse"][0])
    torch.testing.assert_close(grown["masked"][1], grown["sparse"][1])


def test_grow_init_zeros_is_todays_behaviour_and_initial_values_are_checkpointed():
    a, wa = _one_layer("rigl", sparsity=0.5, total_steps=8, update_interval=2)
    b, wb = _one_layer("rigl", sparsity=0.5, total_steps=8, update_interval=2, grow_init="zeros")
    for sparsifier in (a, b):
        for t in range(4):
            sparsifier.model.zero_grad()
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(t))
            sparsifier.model(x).pow(2).sum().backward()
            sparsifier.step()
    assert torch.equal(wa.mask, wb.mask) and torch.equal(wa.param, wb.param)
    c, _ = _one_layer("rigl", sparsity=0.5, grow_init="initial_dist")
    d, _ = _one_layer("rigl", sparsity=0.5, grow_init="initial_dist")
    with torch.no_grad():
        d.model[0].weight.mul_(2)  # another model, whose initial values are not c's
    d.initial_values = {}
    d.load_state_dict(c.state_dict())
    assert torch.equal(d.initial_values["0.weight"], c.initial_values["0.weight"])


# -- SR-STE and Top-KAST: a dense θ, a forward subset (rigl.reserve) ------------------------
THETA = [[0.5, -0.1, 0.2, -0.4], [0.1, 0.3, -0.25, 0.05]]


def _reserved(method, dense_grad, **options):
    """``method`` on one 2x4 Linear holding THETA; one SGD step (lr 0.1, momentum 0.9: the
    first step moves by lr x gradient) with the dense gradient ``dense_grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(THETA))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = rigl.create(method, model, optimizer, total_steps=10, seed=1, **options)
    weight = sparsifier.weights[0]
    before = weight.mask.clone()
    model[0].weight.grad = torch.tensor(dense_grad)
    sparsifier.step()
    sparsifier.check()
    return sparsifier, weight, before, optimizer.state[weight.param]["momentum_buffer"]


def test_srste_trains_every_weight_straight_through_and_decays_the_pruned_ones():
    # 2:4, lambda_w 1: row 0 starts with A = {0, 3} (|θ| 0.5, 0.4), row 1 with {1, 2}.
    # θ' = θ - 0.1 (g + (1 - A) θ): position 1 (g = -5) gets -0.1 + 0.1 * 5.1 = 0.41 and
    # overtakes position 3 (0.4); the pruned 2, (1, 0), (1, 3) shrink by 10%.
    grad = [[0.0, -5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    sparsifier, weight, before, momentum = _reserved(
        "srste", grad, sparsity=0.5, pattern="2:4", lambda_w=1.0, distribution="uniform"
    )
    assert before.tolist() == [[True, False, False, True], [False, True, True, False]]
    assert weight.mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    torch.testing.assert_close(
        weight.param.detach(), torch.tensor([[0.5, 0.41, 0, 0], [0, 0.3, -0.25, 0]])
    )
    torch.testing.assert_close(
        weight.reserve, torch.tensor([[0, 0, 0.18, -0.4], [0.09, 0, 0, 0.045]])
    )
    assert bool(weight.trained.all())  # SR-STE trains all of θ: no optimizer state is reset
    torch.testing.assert_close(momentum, torch.tensor([[0.0, -5.1, 0.2, 0.0], [0.1, 0, 0, 0.05]]))
    assert sparsifier.update_count == 1
    assert rigl.get_method("srste").train_step_flops(1.0, 10.0, update_interval=1) == 12.0


def test_topkast_forwards_the_top_k_and_trains_the_top_k_plus_m():
    # 8 weights, sparsity 0.75: A = top 2 {0, 3}; backward_sparsity 0.5: B = top 4, A and
    # {5, 6} (|θ| 0.3, 0.25). penalty 1, D = 1/4: the gradient gets θ on A and 4 θ on B \ A;
    # outside B nothing moves (position 2's gradient -10 is dropped).
    grad = [[0.0, 0.0, -10.0, 0.0], [0.0, -2.0, 0.0, 0.0]]
    sparsifier, weight, before, momentum = _reserved(
        "topkast", grad, sparsity=0.75, backward_sparsity=0.5, penalty=1.0, distribution="uniform"
    )
    assert before.reshape(-1).nonzero().squeeze(1).tolist() == [0, 3]
    # θ' = [0.45, -0.1, 0.2, -0.36 | 0.1, 0.38, -0.15, 0.05]: A = {0, 5}, B = A + {3, 2}
    assert weight.mask.reshape(-1).nonzero().squeeze(1).tolist() == [0, 5]
    assert weight.trained.reshape(-1).nonzero().squeeze(1).tolist() == [0, 2, 3, 5]
    theta = torch.tensor([[0.45, -0.1, 0.2, -0.36], [0.1, 0.38, -0.15, 0.05]])
    torch.testing.assert_close(weight.values(), theta)
    torch.testing.assert_close(weight.param.detach(), theta * weight.mask)
    # momentum: kept on B (0 and 3 stay trained, 5 too), reset where 6 left B, fresh at 2
    torch.testing.assert_close(momentum, torch.tensor([[0.5, 0, 0, -0.4], [0, -0.8, 0, 0]]))
    facts = sparsifier.train_flops_facts()
    assert facts == {"backward_ratio": 2.0}
    assert rigl.get_method("topkast").train_step_flops(1.0, 10.0, update_interval=1, **facts) == 4.0


@pytest.mark.parametrize("method", ["srste", "topkast"])
def test_reserved_methods_resume_bit_identically(method):
    """The reserve (θ outside A) and B travel in the sparsifier's state: a run stopped at
    step 6 and resumed from its state dicts ends exactly as the run that never stopped."""

    def run(steps, state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparsifier = rigl.create(method, model, optimizer, sparsity=0.75, total_steps=12, seed=2)
        if state is not None:
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
            sparsifier.load_state_dict(state[2])
        for t in range(sparsifier.step_count, steps):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(t))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            sparsifier.step()
        return model, optimizer, sparsifier

    whole = run(12)
    half = run(6)
    saved = [{k: v.clone() for k, v in half[0].state_dict().items()},
             half[1].state_dict(), half[2].state_dict()]  # fmt: skip
    resumed = run(12, saved)
    for a, b in zip(whole[2].weights, resumed[2].weights, strict=True):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.values(), b.values())
        assert torch.equal(a.trained, b.trained)
    for a, b in zip(whole[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    state = half[2].state_dict()
    del state["extra"]["reserves"]
    with pytest.raises(rigl.ConfigError, match="no reserves"):
        run(12, [saved[0], saved[1], state])
    state = half[2].state_dict()
    del state["extra"]["reserves"]["0.weight"]
    with pytest.raises(rigl.ConfigError, match=r"no reserve for 0\.weight"):
        run(12, [saved[0], saved[1], state])
    state = half[2].state_dict()
    state["extra"]["reserves"]["0.weight"]["reserve"] = torch.zeros(3, 3)
    with pytest.raises(rigl.ConfigError, match="saved reserve of 0.weight has shape"):
        run(12, [saved[0], saved[1], state])


@pytest.mark.parametrize("method", ["srste", "topkast"])
@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda r: r.pop("2.weight"), r"no reserve for 2\.weight"),
        (lambda r: r["2.weight"].update(trained=torch.ones(2, 2)), "has shape \\(2, 2\\)"),
        (lambda r: r.update({"2.weight": [1, 2]}), "not a dict of 'reserve' and 'trained'"),
    ],
)
def test_a_refused_reserve_leaves_the_sparsifier_and_model_as_they_were(method, corrupt, message):
    """The reserves are checked before any mask is installed: after the ConfigError the
    sparsifier (masks, reserves, step) and the model are exactly as before the load."""

    def build(steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sparsifier = rigl.create(method, model, optimizer, sparsity=0.75, total_steps=12, seed=2)
        for t in range(steps):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(t))
            optimizer.zero_grad()
            model(x).square().mean().backward()
            sparsifier.step()
        return model, sparsifier

    _, trained = build(6)
    state = trained.state_dict()
    corrupt(state["extra"]["reserves"])
    model, fresh = build(0)
    before = [(w.mask.clone(), w.values().clone(), w.trained.clone()) for w in fresh.weights]
    params = [p.detach().clone() for p in model.parameters()]
    assert any(
        not torch.equal(w.mask, v.mask) for w, v in zip(trained.weights, fresh.weights, strict=True)
    )
    with pytest.raises(rigl.ConfigError, match=message):
        fresh.load_state_dict(state)
    for w, (mask, values, trained_set) in zip(fresh.weights, before, strict=True):
        assert torch.equal(w.mask, mask) and torch.equal(w.values(), values)
        assert torch.equal(w.trained, trained_set)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert fresh.step_count == 0
    fresh.check()  # the invariants hold (counts, zeros, optimizer state)


def test_reserved_methods_refuse_a_sparse_gradient_embedding():
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(rigl.ConfigError, match=r"Embedding\(sparse=True\)"):
        rigl.create("topkast", model, optimizer, sparse_embeddings=True, total_steps=10)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("topkast", {"sparsity": 0.8, "backward_sparsity": 0.9}, "backward_sparsity=0.9 is above"),
        ("topkast", {"penalty": -1.0}, "penalty=-1"),
        ("srste", {"lambda_w": -1.0}, "lambda_w=-1"),
        ("srste", {"skip_optimizer_step_on_update": True}, "would skip them all"),
        ("topkast", {"backend": "sparse"}, "backend='sparse' does not support"),
    ],
)
def test_reserved_methods_refuse_bad_options(method, options, message):
    with pytest.raises(rigl.ConfigError, match=message):
        _one_layer(method, **options)


# -- the command line ----------------------------------------------------------------------
def test_the_newer_methods_train_compare_and_count_flops_through_the_cli(tmp_path):
    """``rigl train`` (MEST on the compressed backend, with an option), ``rigl compare``
    and ``rigl flops`` with the new names, end to end on tiny data."""
    import json

    from conftest import tiny_run_config
    from test_registry import _run_cli

    data = tmp_path / "data"
    data.mkdir()
    config = tiny_run_config(tmp_path, data, method="mest", backend="sparse", epochs=1,
                             checkpoint_every=0, method_options={"drop_lambda": 2.0,
                                                                 "grow_init": "random_normal"})  # fmt: skip
    plain = tiny_run_config(tmp_path / "plain", data, epochs=1, checkpoint_every=0)
    compare = ["compare", "--config", str(plain), "--methods", "mest,granet,srste,topkast",
               "--sparsities", "0.8", "--seeds", "1", "--jobs", "1",
               "--out", str(tmp_path / "c")]  # fmt: skip
    train, cmp, flops = _run_cli(
        [["train", "--config", str(config), "--quiet"], compare,
         ["flops", "--model", "mlp", "--method", "granet", "--json"]],
        plugins="",
    )  # fmt: skip
    assert train["rc"] == cmp["rc"] == flops["rc"] == 0, cmp["err"][-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["train_flops_ratio"] == pytest.approx(final["inference_flops_ratio"])  # 3 f_S
    assert "| MEST |" in cmp["out"] and "| GraNet |" in cmp["out"]
    assert "| SR-STE |" in cmp["out"] and "| Top-KAST |" in cmp["out"]
    records = json.loads((tmp_path / "c" / "results.json").read_text())["records"]
    assert sorted(r["method"] for r in records) == ["dense", "granet", "mest", "srste", "topkast"]
    srste = next(r for r in records if r["method"] == "srste")  # 2 f_S + f_D: dense weight grad
    assert srste["inference_flops_ratio"] < srste["train_flops_ratio"] < 1
    granet = next(r for r in records if r["method"] == "granet")
    assert granet["train_flops_ratio"] > granet["inference_flops_ratio"]  # the dense start
    report = json.loads(flops["out"])
    assert report["inference_flops_ratio"] < report["train_flops_ratio"] < 1


@pytest.mark.parametrize("levels", [None, 3, 50])
@pytest.mark.parametrize(
    "n_forward, n_trained", [(1, 2), (30, 60), (100, 200), (150, 200), (30, 200)]
)
@pytest.mark.parametrize("priority", [False, True])
def test_magnitude_plan_mask_path_chooses_what_the_position_path_chooses(
    monkeypatch, levels, n_forward, n_trained, priority
):
    """SR-STE / Top-KAST's per-step plan on an unstructured one-block layer runs on bool
    masks (no position tensors); the general path (rigl.selection.prune over positions)
    must give the same A, B and tie draws, with masses of tied magnitudes."""
    from rigl import reserve
    from rigl.topology import update_generator

    gen = torch.Generator().manual_seed(n_forward + (levels or 0))
    if levels is None:
        theta = torch.rand(10, 20, generator=gen)
    else:
        theta = torch.randint(-levels, levels + 1, (10, 20), generator=gen).float()
    mask = torch.zeros(200, dtype=torch.bool)
    mask[torch.randperm(200, generator=gen)[:n_forward]] = True
    tie = torch.rand(200, generator=gen)

    def plan():
        weight = reserve.ReservedWeight("w", nn.Parameter(theta.clone()), mask.reshape(10, 20))
        tie_break = tie if priority else update_generator(0, 4, 1)
        result = reserve.magnitude_plan(weight, n_forward, n_trained, tie_break)
        after = None if priority else torch.rand(2, generator=tie_break)
        return result, after

    fast, fast_after = plan()
    monkeypatch.setattr(reserve, "_MASK_PATH", False)
    general, general_after = plan()
    assert torch.equal(fast.keep, general.keep) and torch.equal(fast.grown, general.grown)
    if n_trained == 200:
        assert fast.trained is None and general.trained is None
    else:
        assert torch.equal(fast.trained, general.trained) and fast.trained.numel() == n_trained
    assert fast_after is None or torch.equal(fast_after, general_after)
    assert int(fast.keep.sum()) + fast.grown.numel() == n_forward


def test_reserved_install_on_a_non_contiguous_parameter_matches_the_contiguous_one():
    """A transposed parameter has no flat view: install re-splits the whole θ instead of
    moving the changed positions, and must leave the same parameter, reserve and mask."""
    from rigl import reserve
    from rigl.topology import update_generator

    theta = torch.randn(20, 10, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(10, 20, dtype=torch.bool)
    mask.view(-1)[torch.randperm(200, generator=torch.Generator().manual_seed(8))[:40]] = True
    results = []
    for param in (nn.Parameter(theta.t().contiguous()), nn.Parameter(theta.t())):
        weight = reserve.ReservedWeight("w", param, mask.clone())
        for step in range(3):
            with torch.no_grad():  # move θ so that the magnitude plan changes the masks
                weight.reserve.mul_(1.5 + step)
            plan = reserve.magnitude_plan(weight, 40, 80, update_generator(0, step, 0))
            weight.install(plan, None)
        results.append((param.detach().clone(), weight.reserve.clone(), weight.mask.clone()))
    (p0, r0, m0), (p1, r1, m1) = results
    assert torch.equal(m0, m1) and torch.equal(p0, p1) and torch.equal(r0, r1)
    assert not torch.equal(m0, mask)  # the masks did change
