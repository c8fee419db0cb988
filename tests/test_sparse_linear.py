"""SparseLinear against a dense masked nn.Linear; construction, topology, grow scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rigl.sparse import SparseLinear, kernels
from rigl.sparse import storage as sparse_storage

KERNELS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build"),
    ),
]


def dense_and_mask(n_in, n_out, density, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(n_in, n_out)
    mask = torch.rand(n_out, n_in) < density
    mask[0] = False  # an empty output row
    if density == 1.0:
        mask[:] = True
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense, mask


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize(
    ("n_in", "n_out", "batch", "density"),
    [(20, 30, 1, 0.3), (64, 32, 129, 0.1), (16, 8, 5, 1.0), (50, 40, 64, 0.02)],
)
def test_matches_masked_dense(use, n_in, n_out, batch, density):
    dense, mask = dense_and_mask(n_in, n_out, density)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.kernels = use
    x = torch.randn(batch, n_in)
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(batch, n_out)
    y_dense, y_sparse = dense(x_dense), sparse(x_sparse)
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    y_dense.backward(dy)
    y_sparse.backward(dy)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-5)


def test_stacked_layers_and_3d_input():
    dense1, mask1 = dense_and_mask(12, 16, 0.5, seed=1)
    dense2, mask2 = dense_and_mask(16, 6, 0.5, seed=2)
    net_d = nn.Sequential(dense1, nn.ReLU(), dense2)
    net_s = nn.Sequential(
        SparseLinear.from_dense(dense1, mask1), nn.ReLU(), SparseLinear.from_dense(dense2, mask2)
    )
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(net_s(x), net_d(x), rtol=1e-4, atol=1e-5)
    net_s(x).square().sum().backward()
    net_d(x).square().sum().backward()
    torch.testing.assert_close(
        net_s[2].values.grad, dense2.weight.grad[mask2], rtol=1e-4, atol=1e-5
    )


def test_round_trip_and_properties():
    dense, mask = dense_and_mask(10, 7, 0.4)
    sparse = SparseLinear.from_dense(dense, mask)
    back = sparse.to_dense()
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)
    assert sparse.shape == (7, 10) and sparse.n_active == int(mask.sum())
    assert sparse.density == pytest.approx(mask.float().mean().item())
    assert [n for n, _ in sparse.named_parameters()] == ["values", "bias"]
    assert sparse.values.shape == (sparse.n_active,)


def test_random_init_has_exact_count():
    layer = SparseLinear(100, 50, density=0.1, generator=torch.Generator().manual_seed(0))
    assert layer.n_active == 500
    assert layer.to_dense().weight.count_nonzero() == 500


def test_optimizer_state_is_nnz_sized():
    layer = SparseLinear(40, 30, density=0.2)
    opt = torch.optim.Adam(layer.parameters())
    layer(torch.randn(4, 40)).sum().backward()
    opt.step()
    assert opt.state[layer.values]["exp_avg"].shape == (layer.n_active,)


def test_set_topology_keeps_parameter_and_reorders():
    layer = SparseLinear(6, 4, density=0.5)
    values_param = layer.values
    flat = torch.tensor([23, 0, 7, 12, 5, 1, 18, 9, 2, 14, 20, 3])
    new_values = torch.arange(12.0)
    order = layer.set_topology(flat, new_values)
    assert layer.values is values_param
    assert torch.equal(layer.active_indices(), torch.sort(flat).values)
    assert torch.equal(layer.values.detach(), new_values[order])
    weight = layer.to_dense().weight.reshape(-1)
    assert torch.equal(weight[flat], new_values)
    coo = torch.stack([flat // 6, flat % 6])
    layer.set_topology(coo, new_values)
    assert torch.equal(layer.to_dense().weight.reshape(-1)[flat], new_values)


def test_state_dict_round_trip_with_other_nnz():
    src = SparseLinear(9, 8, density=0.3)
    dst = SparseLinear(9, 8, density=0.6)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.to_dense().weight, src.to_dense().weight)
    x = torch.randn(3, 9)
    torch.testing.assert_close(dst(x), src(x))


def test_grad_rows_and_grow_candidates_match_dense_gradient(monkeypatch):
    dense, mask = dense_and_mask(24, 20, 0.3)
    sparse = SparseLinear.from_dense(dense, mask)
    x, dy = torch.randn(16, 24), torch.randn(16, 20)
    sparse.keep_grow_inputs()
    sparse(x).backward(dy)
    dense(x).backward(dy)
    full = dense.weight.grad
    torch.testing.assert_close(sparse.grad_rows(3, 11), full[3:11], rtol=1e-4, atol=1e-5)
    # RigL's grow on this layer: the blockwise top-k of |grad_rows| outside the active set
    monkeypatch.setattr(sparse_storage, "BLOCK_ELEMENTS", 7 * 24)  # blocks of 7 rows
    pos = sparse_storage._blockwise_topk(
        lambda r0, r1: sparse.grad_rows(r0, r1).abs(),
        20,
        24,
        sparse.active_indices(),
        10,
        torch.Generator().manual_seed(0),
        "w",
    )
    expect = full.abs().masked_fill(mask, -1).reshape(-1).topk(10)
    assert set(pos.tolist()) == set(expect.indices.tolist())
    score = torch.sort(full.abs().reshape(-1)[pos], descending=True).values
    torch.testing.assert_close(score, expect.values, rtol=1e-4, atol=1e-5)
    sparse.keep_grow_inputs(False)
    with pytest.raises(RuntimeError, match="keep_grow_inputs"):
        sparse.grad_rows(0, 1)
