"""SparseLinear against a dense masked nn.Linear; construction, topology, grow scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.blockwise import blockwise_topk
from rigl.sparse import SparseLinear, kernels

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


def test_grad_rows_and_grow_candidates_match_dense_gradient():
    dense, mask = dense_and_mask(24, 20, 0.3)
    sparse = SparseLinear.from_dense(dense, mask)
    x, dy = torch.randn(16, 24), torch.randn(16, 20)
    sparse.keep_grow_inputs()
    sparse(x).backward(dy)
    dense(x).backward(dy)
    full = dense.weight.grad
    torch.testing.assert_close(sparse.grad_rows(3, 11), full[3:11], rtol=1e-4, atol=1e-5)
    # RigL's grow on this layer: the blockwise top-k of |grad_rows| outside the active set
    pos = blockwise_topk(
        lambda r0, r1: sparse.grad_rows(r0, r1).abs(),
        20,
        24,
        sparse.active_indices(),
        10,
        torch.Generator().manual_seed(0),
        "w",
        block_rows=7,
    )
    expect = full.abs().masked_fill(mask, -1).reshape(-1).topk(10)
    assert set(pos.tolist()) == set(expect.indices.tolist())
    score = torch.sort(full.abs().reshape(-1)[pos], descending=True).values
    torch.testing.assert_close(score, expect.values, rtol=1e-4, atol=1e-5)
    sparse.keep_grow_inputs(False)
    with pytest.raises(RuntimeError, match="keep_grow_inputs"):
        sparse.grad_rows(0, 1)


# -- inputs the kernels must not trust (issue 12, items 5, 6, 8) ------------------------------
def _dirty_heap(n: int) -> None:
    """Leave NaN-filled blocks of ``n`` floats in the allocator, so that memory a kernel
    forgets to write shows up as garbage instead of happening to be zero."""
    for _ in range(4):
        junk = torch.full((n,), float("nan"))
        del junk


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 3, 64)])
def test_empty_batch_gives_zero_gradients(use, shape):
    """A mixture-of-experts expert that receives no token."""
    layer = SparseLinear(64, 64, density=0.5, generator=torch.Generator().manual_seed(0))
    layer.kernels = use
    x = torch.randn(shape, requires_grad=True)
    for _ in range(3):
        _dirty_heap(layer.n_active)
        layer.zero_grad()
        y = layer(x)
        assert y.shape == (*x.shape[:-1], 64)
        y.sum().backward()
        assert torch.equal(layer.values.grad, torch.zeros_like(layer.values))
        assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
        assert x.grad.shape == x.shape


def _linear_error(layer: nn.Linear, x: torch.Tensor) -> str:
    with pytest.raises(RuntimeError) as err:
        layer(x)
    return str(err.value)


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize(
    "x",
    [
        torch.randn(4, 15),  # too narrow: garbage from the compiled kernels before
        torch.randn(4, 17),  # too wide: the last feature was silently ignored
        torch.randn(2, 3, 15),
        torch.randn(15),
        torch.tensor(1.0),
        torch.randn(4, 16, dtype=torch.float64),
        torch.randint(0, 3, (4, 16)),
        torch.randn(4, 16, dtype=torch.bfloat16),
    ],
    ids=["narrow", "wide", "3d", "1d", "0d", "float64", "int64", "bf16"],
)
def test_bad_inputs_get_the_error_of_nn_linear(use, x, monkeypatch):
    dense, mask = dense_and_mask(16, 8, 0.5)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.kernels = use
    for name in ("forward", "backward", "transpose"):  # refused before any kernel runs
        monkeypatch.setattr(kernels, name, lambda *a, **k: pytest.fail("a kernel ran"))
    with pytest.raises(RuntimeError) as err:
        sparse(x)
    assert str(err.value) == _linear_error(dense, x)


def test_input_on_another_device_is_refused():
    sparse = SparseLinear(16, 8, density=0.5)
    with pytest.raises(RuntimeError, match="same device.*meta"):
        sparse(torch.empty(4, 16, device="meta"))


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize(
    "make_x",
    [
        lambda: torch.randn(16),
        lambda: torch.randn(2, 3, 16),
        lambda: torch.randn(2, 3, 4, 16),
        lambda: torch.randn(16, 5).t(),  # non-contiguous (a transposed view)
        lambda: torch.randn(6, 32)[:, ::2],  # non-contiguous (strided columns)
        lambda: torch.randn(3, 16, 4).transpose(1, 2),  # 3-D, non-contiguous
    ],
    ids=["1d", "3d", "4d", "transposed", "strided", "3d-transposed"],
)
def test_leading_dims_and_layouts_work_as_for_nn_linear(use, make_x):
    dense, mask = dense_and_mask(16, 8, 0.5)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.kernels = use
    x = make_x()
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, y_sparse = dense(x_dense), sparse(x_sparse)
    assert y_sparse.shape == y_dense.shape
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y_dense)
    y_dense.backward(dy)
    y_sparse.backward(dy)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], rtol=1e-4, atol=1e-5)


LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize("dtype", LOW_PRECISION.values(), ids=LOW_PRECISION.keys())
def test_low_precision_weights_and_inputs_match_nn_linear(use, dtype):
    dense, mask = dense_and_mask(48, 40, 0.3)
    dense = dense.to(dtype)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.kernels = use
    assert sparse.values.dtype == dtype
    x = torch.randn(70, 48, dtype=dtype)  # two batch chunks and a tail
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, y_sparse = dense(x_dense), sparse(x_sparse)
    assert y_sparse.dtype == dtype
    tol = {"rtol": 2e-2, "atol": 2e-2}  # a few units of bf16 rounding (fp32 accumulation)
    torch.testing.assert_close(y_sparse, y_dense, **tol)
    dy = torch.randn_like(y_dense)
    y_dense.backward(dy)
    y_sparse.backward(dy)
    torch.testing.assert_close(x_sparse.grad, x_dense.grad, **tol)
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], **tol)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **tol)


class _ConvHead(nn.Module):
    """A conv feeding a linear head: under autocast the head gets a bf16 input."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 10)
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("use", KERNELS)
@pytest.mark.parametrize("dtype", LOW_PRECISION.values(), ids=LOW_PRECISION.keys())
def test_autocast_computes_like_nn_linear(use, dtype):
    dense_head, mask = dense_and_mask(4 * 6 * 6, 10, 0.3)
    torch.manual_seed(1)
    net_dense = _ConvHead(dense_head)
    sparse_head = SparseLinear.from_dense(dense_head, mask)
    sparse_head.kernels = use
    net_sparse = _ConvHead(sparse_head)
    net_sparse.conv.load_state_dict(net_dense.conv.state_dict())
    x = torch.randn(5, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        y_dense, y_sparse = net_dense(x), net_sparse(x)
        y_plain = sparse_head(torch.randn(5, 4 * 6 * 6))  # a float32 input is cast too
    assert y_sparse.dtype == y_dense.dtype == y_plain.dtype == dtype
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y_sparse, y_dense, **tol)
    y_dense.float().square().sum().backward()
    y_sparse.float().square().sum().backward()
    assert sparse_head.values.grad.dtype == torch.float32  # the parameters stay float32
    grad = dense_head.weight.grad[mask]
    torch.testing.assert_close(sparse_head.values.grad, grad, **tol)
    torch.testing.assert_close(net_sparse.conv.weight.grad, net_dense.conv.weight.grad, **tol)
    with torch.autocast("cpu", dtype=dtype):  # float64 is left alone, as by nn.Linear
        assert sparse_head.double()(torch.randn(2, 4 * 6 * 6, dtype=torch.float64)).dtype == (
            torch.float64
        )


# -- corrupt indices in a loaded state dict (issue 12, item 7) --------------------------------
def _corrupt(state: dict, key: str, how: str) -> dict:
    state = {k: v.clone() for k, v in state.items()}
    t = state[key]
    if how == "out_of_range":
        t[len(t) // 2] = 10_000
    elif how == "negative":
        t[1] = -3
    elif how == "not_monotone":
        t[2] = t[3] + 1  # row 2 would have -1 entries
    elif how == "wrong_length":
        t = t[:-1]
    elif how == "float":
        t = t.float()
    elif how == "duplicate":  # two equal columns in one row
        t[1] = t[0]
    state[key] = t
    return state


@pytest.mark.parametrize(
    ("key", "how"),
    [
        ("col_idx", "out_of_range"),
        ("col_idx", "negative"),
        ("col_idx", "wrong_length"),
        ("col_idx", "float"),
        ("col_idx", "duplicate"),
        ("row_ptr", "out_of_range"),
        ("row_ptr", "not_monotone"),
        ("row_ptr", "wrong_length"),
        ("row_ptr", "float"),
    ],
)
def test_corrupt_indices_in_a_state_dict_are_refused(key, how, sparse_kernels):
    src = SparseLinear(16, 8, density=0.6, generator=torch.Generator().manual_seed(0))
    dst = SparseLinear(16, 8, density=0.3, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(rigl.ConfigError, match=f"'{key}'"):
        dst.load_state_dict(_corrupt(src.state_dict(), key, how))
    for k, v in dst.state_dict().items():  # nothing was modified
        assert torch.equal(v, before[k]), k


def test_the_csc_index_in_a_state_dict_is_rebuilt_not_trusted(sparse_kernels):
    src = SparseLinear(16, 8, density=0.6, generator=torch.Generator().manual_seed(0))
    state = src.state_dict()
    state["perm"] = torch.full_like(state["perm"], 1 << 30)  # would be read out of bounds
    state["row_idx"] = torch.full_like(state["row_idx"], -7)
    state["col_ptr"] = torch.zeros_like(state["col_ptr"])
    dst = SparseLinear(16, 8, density=0.3)
    dst.load_state_dict(state)
    for name, tensor in src.index.tensors().items():
        assert torch.equal(dst.index.tensors()[name], tensor), name
        assert torch.equal(getattr(dst, name), tensor), name


def test_set_topology_needs_one_value_per_position():
    layer = SparseLinear(6, 4, density=0.5)
    with pytest.raises(ValueError, match="3 positions but values of shape \\(2,\\)"):
        layer.set_topology(torch.tensor([0, 5, 9]), torch.ones(2))
    assert layer.n_active == 12  # unchanged


@pytest.mark.parametrize("pattern", ["unstructured", "fanin"])
def test_to_empty_keeps_the_index_of_compressed_layers(pattern):
    """``model.to_empty(device=...)``, the idiom for models built on the meta device,
    replaces every tensor by uninitialised memory: the kernels would then index with garbage
    (a segfault). The index buffers keep their contents; the values are uninitialised, as
    to_empty promises, until set."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create("rigl", model, optimizer, sparsity=0.75, backend="sparse", pattern=pattern,
                     total_steps=20)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    model.to_empty(device="cpu")
    after = {k: v for k, v in model.state_dict().items() if not v.is_floating_point()}
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    assert torch.isfinite(model(torch.randn(8, 16))).all()
    sp.check()
