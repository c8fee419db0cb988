"""CondensedLinear against a dense masked nn.Linear; topology, checkpoints, RigL's seam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.blockwise import blockwise_topk
from rigl.rewiring import Rewiring
from rigl.sparse import CondensedLinear, kernels
from rigl.sparse.storage import SparseWeight

KERNELS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build"),
    ),
]


def layer_pair(n_in, n_out, seed=0, **pattern):
    """A CondensedLinear and the nn.Linear with its dense weight (zeros off the pattern)."""
    layer = CondensedLinear(n_in, n_out, generator=torch.Generator().manual_seed(seed), **pattern)
    return layer, layer.to_dense()


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize(
    ("n_in", "n_out", "batch", "pattern"),
    [
        (20, 30, 1, {"fan_in": 6}),
        (64, 32, 129, {"density": 0.1}),
        (16, 8, 5, {}),  # dense
        (48, 40, 64, {"nm": "2:4"}),
        (64, 24, 7, {"nm": (1, 8)}),
    ],
)
def test_matches_masked_dense(use, n_in, n_out, batch, pattern):
    sparse, dense = layer_pair(n_in, n_out, **pattern)
    sparse.kernels = use
    x = torch.randn(batch, n_in)
    x_sparse, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_sparse, y_dense = sparse(x_sparse), dense(x_dense)
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y_dense)
    y_sparse.backward(dy)
    y_dense.backward(dy)
    mask = dense.weight.detach() != 0
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, rtol=1e-4, atol=1e-5)
    expect = dense.weight.grad.gather(1, sparse.col_idx.long()).reshape(-1)
    torch.testing.assert_close(sparse.values.grad, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)
    assert torch.equal(mask.sum(1), torch.full((n_out,), sparse.fan_in))


@pytest.mark.parametrize("use", KERNELS)
def test_three_layers_train_like_the_masked_dense_model(use):
    """SGD steps of a 3-layer MLP (ReLU): same losses and weights as nn.Linear with masks."""
    layers = [layer_pair(32, 32, seed=i, fan_in=5)[0] for i in range(3)]
    for layer in layers:
        layer.kernels = use
    sparse = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
    dense = nn.Sequential(*(m.to_dense() if isinstance(m, CondensedLinear) else m for m in sparse))
    masks = [m.weight.detach() != 0 for m in dense if isinstance(m, nn.Linear)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sparse, dense)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, target = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen)
        losses = []
        for model, opt in zip((sparse, dense), opts, strict=True):
            opt.zero_grad()
            loss = ((model(x) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            for m, mask in zip([m for m in dense if isinstance(m, nn.Linear)], masks, strict=True):
                m.weight.mul_(mask)
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for s, d in zip(layers, [m for m in dense if isinstance(m, nn.Linear)], strict=True):
        torch.testing.assert_close(s.weight.detach(), d.weight.detach(), rtol=1e-5, atol=1e-6)


def test_construction_and_properties():
    layer = CondensedLinear(16, 6, fan_in=5, generator=torch.Generator().manual_seed(0))
    assert (layer.fan_in, layer.n_active, layer.nm, layer.shape) == (5, 30, None, (6, 16))
    assert layer.values.shape == (30,) and layer.col_idx.shape == (6, 5)
    assert layer.col_idx.dtype == torch.int32
    assert layer.density == pytest.approx(30 / 96)
    assert "fan_in=5" in repr(layer) and "density=0.3125" in repr(layer)
    assert torch.equal(layer.active_indices(), layer.weight.detach().reshape(-1).nonzero()[:, 0])
    nm = CondensedLinear(16, 6, nm="1:4")
    assert (nm.fan_in, nm.nm) == (4, (1, 4)) and "nm='1:4'" in repr(nm)
    assert CondensedLinear(10, 3, density=0.25).fan_in == 2  # round(2.5) = 2
    assert CondensedLinear(10, 3).fan_in == 10
    assert set(layer.state_dict()) == {"values", "bias", "col_idx"}  # no CSC in checkpoints
    # the derived CSC's flat column index is a view of col_idx, not a second copy
    assert layer.index.csc.col_idx.data_ptr() == layer.col_idx.data_ptr()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nm": "3:2"}, "0 < N <= M"),
        ({"nm": "2-4"}, "expected 'N:M'"),
        ({"nm": "1:3"}, "in_features divisible by 3; this layer has 16"),
        ({"fan_in": 17}, "0 <= fan_in <= in_features"),
        ({"density": 1.5}, "0 <= density <= 1"),
        ({"fan_in": 3, "nm": "2:4"}, "one of fan_in, density and nm"),
    ],
)
def test_bad_patterns_are_refused(kwargs, message):
    with pytest.raises(rigl.ConfigError, match=message):
        CondensedLinear(16, 4, **kwargs)


def test_weight_view_is_differentiable_and_dense_round_trip():
    layer, dense = layer_pair(12, 5, fan_in=3)
    layer.weight.sum().backward()
    assert torch.equal(layer.values.grad, torch.ones(15))
    back = CondensedLinear.from_dense(dense, dense.weight != 0)
    assert torch.equal(back.values, layer.values) and torch.equal(back.col_idx, layer.col_idx)
    mask = dense.weight != 0
    mask[2, mask[2].nonzero()[0]] = False  # one row with fewer inputs
    with pytest.raises(ValueError, match="row 2 has 2 active inputs, row 0 has 3"):
        CondensedLinear.from_dense(dense, mask)
    _, nm_dense = layer_pair(16, 4, nm="2:4")
    assert CondensedLinear.from_dense(nm_dense, nm_dense.weight != 0, nm="2:4").nm == (2, 4)
    with pytest.raises(rigl.ConfigError, match="8 active inputs per row; this 2:8 layer keeps 4"):
        CondensedLinear.from_dense(nm_dense, nm_dense.weight != 0, nm="2:8")


def test_set_topology_keeps_parameter_reorders_and_refuses_uneven_rows():
    layer = CondensedLinear(6, 3, fan_in=2, generator=torch.Generator().manual_seed(0))
    param = layer.values
    order = layer.set_topology(torch.tensor([13, 1, 8, 0, 17, 6]), torch.arange(6.0))
    assert layer.values is param
    assert layer.active_indices().tolist() == [0, 1, 6, 8, 13, 17]
    assert layer.values.tolist() == [3.0, 1.0, 5.0, 2.0, 0.0, 4.0]
    assert torch.equal(torch.arange(6.0)[order], layer.values.detach())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="row 1 has 1 active inputs, row 0 has 3"):
        layer.set_topology(torch.tensor([0, 1, 2, 6, 13, 17]), torch.ones(6))
    with pytest.raises(ValueError, match="one value per position"):
        layer.set_topology(torch.tensor([0, 1, 6, 7, 12, 13]), torch.ones(5))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer.set_topology(torch.tensor([[0, 1, 2], [5, 5, 5]]), torch.ones(3))  # coordinates
    assert layer.fan_in == 1 and layer.active_indices().tolist() == [5, 11, 17]


def test_state_dict_round_trip_with_other_fan_in_and_device_moves():
    src = CondensedLinear(9, 8, fan_in=3)
    dst = CondensedLinear(9, 8, fan_in=6)
    dst.load_state_dict(src.state_dict())
    assert dst.fan_in == 3 and torch.equal(dst.weight, src.weight)
    x = torch.randn(3, 9)
    torch.testing.assert_close(dst(x), src(x))
    moved = dst.to(torch.float64)
    assert moved.index.col_idx is moved.col_idx and moved.values.dtype == torch.float64


def _corrupt(state, how):
    state = dict(state)
    cols = state["col_idx"].clone()
    if how == "out_of_range":
        cols[1, 0] = 99
    elif how == "unsorted":
        cols[2] = cols[2].flip(0)
    elif how == "float":
        cols = cols.float()
    elif how == "rows":
        cols = cols[:-1]
    elif how == "values":
        state["values"] = state["values"][:-1]
    state["col_idx"] = cols
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("out_of_range", "'col_idx' holds column 99"),
        ("unsorted", "'col_idx' is not strictly increasing within row 2"),
        ("float", "'col_idx' has dtype torch.float32"),
        ("rows", "'col_idx' has shape"),
        ("values", "'values' has shape"),
    ],
)
def test_corrupt_indices_in_a_state_dict_are_refused(how, message):
    src = CondensedLinear(16, 8, fan_in=4, generator=torch.Generator().manual_seed(0))
    dst = CondensedLinear(16, 8, fan_in=2, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(rigl.ConfigError, match=message):
        dst.load_state_dict(_corrupt(src.state_dict(), how))
    for k, v in dst.state_dict().items():  # nothing was modified
        assert torch.equal(v, before[k]), k


def test_an_n_m_layer_refuses_a_checkpoint_breaking_its_groups():
    fan_in = CondensedLinear(16, 4, fan_in=8, generator=torch.Generator().manual_seed(0))
    two_four = CondensedLinear(16, 4, nm="2:4")
    with pytest.raises(rigl.ConfigError, match="2:4 layer keeps 2 in every group of 4"):
        two_four.load_state_dict(fan_in.state_dict())
    three_four = CondensedLinear(16, 4, nm="3:4")  # every group right, but 3, not 2
    with pytest.raises(rigl.ConfigError, match="12 active inputs per row; this 2:4 layer keeps 8"):
        two_four.load_state_dict(three_four.state_dict())
    other = CondensedLinear(16, 4, nm="2:4", generator=torch.Generator().manual_seed(3))
    two_four.load_state_dict(other.state_dict())
    assert torch.equal(two_four.weight, other.weight)


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_empty_batch_gives_zero_gradients(use, shape):
    layer = CondensedLinear(16, 8, fan_in=4)
    layer.kernels = use
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*x.shape[:-1], 8)
    y.sum().backward()
    assert torch.equal(layer.values.grad, torch.zeros(32)) and x.grad.shape == x.shape


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize(
    "x",
    [torch.randn(4, 15), torch.randn(4, 17), torch.tensor(1.0), torch.randn(4, 16).double()],
    ids=["narrow", "wide", "0d", "float64"],
)
def test_bad_inputs_get_the_error_of_nn_linear(use, x, monkeypatch):
    layer, dense = layer_pair(16, 8, fan_in=4)
    layer.kernels = use
    with pytest.raises(RuntimeError) as expected:
        dense(x)
    monkeypatch.setattr(kernels, "_pick", lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(RuntimeError) as err:
        layer(x)
    assert str(err.value) == str(expected.value)
    with pytest.raises(RuntimeError, match="same device.*meta"):
        layer(torch.empty(4, 16, device="meta"))


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_nn_linear(use, dtype):
    layer, dense = layer_pair(48, 40, nm="1:4")
    layer, dense = layer.to(dtype), dense.to(dtype)
    layer.kernels = use
    x = torch.randn(70, 48, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, dense(x), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.values.grad.dtype == dtype


def test_grad_rows_and_grad_at_match_dense_gradient():
    layer, dense = layer_pair(24, 20, fan_in=5)
    x, dy = torch.randn(16, 24), torch.randn(16, 20)
    layer.keep_grow_inputs()
    for half in (slice(0, 9), slice(9, 16)):  # two accumulated backward calls
        layer(x[half]).backward(dy[half])
        dense(x[half]).backward(dy[half])
    full = dense.weight.grad
    torch.testing.assert_close(layer.grad_rows(3, 11), full[3:11], rtol=1e-4, atol=1e-5)
    flat = torch.tensor([7, 3, 400, 25])
    torch.testing.assert_close(layer.grad_at(flat), full.reshape(-1)[flat], rtol=1e-4, atol=1e-5)
    layer.keep_grow_inputs(False)
    with pytest.raises(RuntimeError, match="keep_grow_inputs"):
        layer.grad_rows(0, 1)


def _per_row_rewiring(layer: CondensedLinear, n: int) -> Rewiring:
    """Fan-in RigL by hand: in every row drop the n smallest |θ| and grow the n largest
    |grad| outside the kept positions (the selection the seam's fan-in pattern makes)."""
    k, rows, cols = layer.fan_in, layer.out_features, layer.in_features
    active = layer.active_indices().reshape(rows, k)
    magnitude = layer.values.detach().abs().reshape(rows, k)
    kept = active.gather(1, magnitude.topk(k - n, dim=1).indices)
    score = layer.grad_rows(0, rows).abs()
    score.scatter_(1, kept % cols, -1.0)
    grown = score.topk(n, dim=1).indices + torch.arange(rows)[:, None] * cols
    keep = torch.isin(layer.active_indices(), kept.reshape(-1))
    return Rewiring(keep, grown.reshape(-1))


def test_sparse_weight_drives_rigl_on_a_condensed_layer():
    layer = CondensedLinear(24, 10, fan_in=6, generator=torch.Generator().manual_seed(0))
    weight = SparseWeight("fc.weight", layer)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    x = torch.randn(8, 24)
    layer(x).square().sum().backward()
    opt.step()
    weight.prepare_step(True)
    opt.zero_grad()
    layer(x).square().sum().backward()
    old = dict(zip(layer.active_indices().tolist(), layer.values.detach().tolist(), strict=True))
    old_state = dict(zip(old, opt.state[layer.values]["exp_avg"].tolist(), strict=True))
    plan = _per_row_rewiring(layer, 2)
    stats = weight.install(plan, opt, grown_gradient=True)
    assert layer.fan_in == 6 and weight.violations(opt) == []
    assert stats.n_active == 60 and 0 < stats.n_grown <= 20
    dense_grad = layer.grad_rows(0, 10).reshape(-1)
    for pos, value, state, grad in zip(
        layer.active_indices().tolist(),
        layer.values.detach().tolist(),
        opt.state[layer.values]["exp_avg"].tolist(),
        layer.values.grad.tolist(),
        strict=True,
    ):
        if pos in old:  # kept: value and state move with the weight
            assert (value, state) == (old[pos], old_state[pos])
        else:  # grown: zero weight, fresh state, the dense gradient there
            assert (value, state) == (0.0, 0.0)
            assert grad == pytest.approx(dense_grad[pos].item(), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="same number in every row"):
        uneven = torch.ones(layer.n_active, dtype=torch.bool)
        uneven[0] = False  # row 0 would keep 5 of its 6
        weight.install(Rewiring(uneven, torch.zeros(0, dtype=torch.int64)), opt)
    assert weight.violations(opt) == [] and layer.n_active == 60


def test_sparse_weight_grow_scan_runs_on_a_condensed_layer(monkeypatch):
    layer, dense = layer_pair(24, 20, fan_in=5)
    x, dy = torch.randn(16, 24), torch.randn(16, 20)
    layer.keep_grow_inputs()
    layer(x).backward(dy)
    dense(x).backward(dy)
    weight = SparseWeight("w", layer)
    pos = blockwise_topk(
        lambda r0, r1: weight.gradient_rows(r0, r1).abs(),
        20,
        24,
        layer.active_indices(),
        10,
        torch.Generator().manual_seed(0),
        "w",
        block_rows=7,
    )
    mask = dense.weight.detach() != 0
    expect = dense.weight.grad.abs().masked_fill(mask, -1).reshape(-1).topk(10)
    assert set(pos.tolist()) == set(expect.indices.tolist())
