"""Compressed convolutions: kernels against torch's convolutions, gradcheck, grow scores,
the same training as the masked backend, checkpoints, meta-device models, input errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl.sparse import SparseConv1d, SparseConv2d, conv_kernels, load_sparse, save_sparse
from rigl.sparse.conv import SparseConvFunction
from rigl.sparse.storage import SparseWeight

# (in, out, kernel, stride, padding, dilation, height, width)
GEOMETRIES = [
    (3, 5, 3, 1, 1, 1, 7, 8),  # the common 3x3 "same" convolution
    (4, 6, 3, 2, 1, 1, 9, 9),  # strided
    (2, 3, (3, 2), (2, 1), (0, 1), (1, 2), 8, 9),  # everything differs per dimension
    (3, 4, 1, 2, 0, 1, 5, 6),  # a 1x1 strided shortcut
    (4, 4, 5, 1, 2, 2, 10, 11),  # dilated
    (3, 4, 3, 1, 3, 1, 6, 7),  # padded beyond the kernel: the input gradient as a scatter
    (2, 3, 3, 1, 1, 1, 5, 21),  # rows of two full 8-wide tiles and a tail
]


def _pair(geometry, dtype=torch.float64, density=0.4, seed=0):
    """A dense convolution with inactive weights zeroed and its compressed copy."""
    c_in, c_out, k, s, p, d, _, _ = geometry
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, s, p, d).to(dtype)
    mask = torch.rand(conv.weight.shape) < density
    layer = SparseConv2d.from_dense(conv, mask)
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, layer


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_products_equal_torchs_convolution(geometry, sparse_kernels):
    conv, layer = _pair(geometry)
    x = torch.randn(3, geometry[0], *geometry[6:], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, conv(x))
    dy = torch.randn_like(y)
    dx, dvalues, dbias = torch.autograd.grad(y, (x, layer.values, layer.bias), dy)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), dy)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dvalues, dw_ref.reshape(-1)[layer.active_indices()])
    torch.testing.assert_close(dbias, db_ref)


def _assert_float32_products_match(conv, layer, x, weight_grad=True):
    """The layer's output, input gradient and (``weight_grad``) active weight gradient
    equal the masked dense convolution's, to float32 rounding."""
    y = layer(x)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    dx, dvalues = torch.autograd.grad(y, (x, layer.values), dy)
    dx_ref, dw_ref = torch.autograd.grad(conv(x), (x, conv.weight), dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    if weight_grad:
        torch.testing.assert_close(
            dvalues, dw_ref.reshape(-1)[layer.active_indices()], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("batch", [1, 8, 19])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[-1]])
def test_float32_products_over_full_and_partial_image_blocks(geometry, batch, sparse_kernels):
    """The kernels work on blocks of 8 images (float32 through register transposes): a
    batch of one, exactly one block, and two blocks plus a tail of three, against torch."""
    conv, layer = _pair(geometry, dtype=torch.float32)
    x = torch.randn(batch, geometry[0], *geometry[6:], requires_grad=True)
    _assert_float32_products_match(conv, layer, x)


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
@pytest.mark.parametrize("height", [16, 13])
def test_small_batches_fold_bands_of_rows_into_the_lanes(batch, height, sparse_kernels):
    """Under 8 images, a stride-1 convolution that keeps its height puts bands of rows of
    each image in the lanes (8, 4, 2 or 1 bands; 13 rows leave a short last band and an
    unused lane): the same results as torch, forward and both gradients."""
    geometry = (6, 5, 3, 1, 1, 1, height, 19)
    conv, layer = _pair(geometry, dtype=torch.float32)
    x = torch.randn(batch, 6, height, 19, requires_grad=True)
    _assert_float32_products_match(conv, layer, x)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_gradcheck_of_every_kernel(geometry, sparse_kernels):
    """Forward, input gradient and weight gradient against finite differences (float64)."""
    _, layer = _pair(geometry, density=0.5)
    x = torch.randn(1, geometry[0], *geometry[6:], dtype=torch.float64, requires_grad=True)
    values = layer.values.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, values, bias):
        return SparseConvFunction.apply(
            x, values, bias, layer.index, layer.geometry, None, sparse_kernels
        )

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_conv1d_and_unbatched_inputs_equal_torchs(sparse_kernels):
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 4, stride=2, padding=3, dilation=2).double()
    mask = torch.rand(conv.weight.shape) < 0.5
    layer = SparseConv1d.from_dense(conv, mask)
    with torch.no_grad():
        conv.weight.mul_(mask)
    x = torch.randn(4, 3, 17, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer(x[0]), conv(x[0]))  # (C, L): unbatched
    _, layer2 = _pair(GEOMETRIES[0])
    x2 = torch.randn(3, 7, 8, dtype=torch.float64)
    assert layer2(x2).shape == (5, 7, 8)
    torch.testing.assert_close(layer2.to_dense()(x2), layer2(x2))


def test_bfloat16_is_computed_in_float32_and_rounded_once(sparse_kernels):
    _, layer = _pair(GEOMETRIES[0], dtype=torch.float32)
    x = torch.randn(2, 3, 7, 8)
    expected = layer(x)
    y = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 layer under autocast
        z = layer.float()(x)
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32


def test_grow_scores_are_the_dense_kernel_gradient_accumulated(sparse_kernels):
    """grad_rows: the dense gradient block by block of output channels; grad_at: at given
    positions (SDDMM); both summed over the kept backward calls."""
    conv, layer = _pair(GEOMETRIES[1], dtype=torch.float32)
    layer.keep_grow_inputs(True)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 4, 9, 9, generator=g)
        layer(x).pow(2).sum().backward()
        conv(x).pow(2).sum().backward()
    dense = conv.weight.grad.reshape(6, -1)
    torch.testing.assert_close(torch.cat([layer.grad_rows(0, 4), layer.grad_rows(4, 6)]), dense)
    flat = torch.tensor([5, 0, 200, 17, 35])
    torch.testing.assert_close(layer.grad_at(flat), dense.reshape(-1)[flat])
    layer.keep_grow_inputs(False)
    with pytest.raises(RuntimeError, match="keep_grow_inputs"):
        layer.grad_rows(0, 1)


class _CNN(nn.Module):
    """A tiny CNN: 3x3 "same", strided 3x3, 1x1, Conv1d-free, BatchNorm, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(12, 12, 1)
        self.head = nn.Linear(12 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, 8, 8) -> (B, 3)
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.head(x.flatten(1))


def _train(backend: str, method: str, steps: int, optimizer: str = "sgd"):
    torch.manual_seed(0)
    model = _CNN()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sp = rigl.create(
        method, model, opt, sparsity=0.8, total_steps=steps, update_interval=8,
        drop_fraction=0.4, backend=backend, seed=4,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 2, 8, 8, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    return model, sp


@pytest.mark.parametrize(
    "method,steps,optimizer",
    [
        pytest.param("rigl", 240, "sgd", marks=pytest.mark.slow),  # 22 updates
        pytest.param("set", 240, "sgd", marks=pytest.mark.slow),
        ("rigl", 48, "sgd"),  # the fast variant: 6 updates
        ("static", 24, "sgd"),
        ("rigl", 48, "adam"),
    ],
)
def test_same_masks_and_weights_on_both_backends(method, steps, optimizer):
    _, masked = _train("masked", method, steps, optimizer)
    model, sparse = _train("sparse", method, steps, optimizer)
    assert {type(model.conv1), type(model.conv2), type(model.conv3)} == {SparseConv2d}
    if method != "static":
        assert sparse.update_count == masked.update_count >= (20 if steps > 200 else 4)
    for name, mask in masked.masks.items():
        assert torch.equal(mask, sparse.masks[name]), name
    for a, b in zip(masked.weights, sparse.weights, strict=True):
        torch.testing.assert_close(a.param.detach(), b.layer.weight.detach(), rtol=1e-4, atol=1e-5)


def test_export_and_load_of_compressed_convolutions(tmp_path):
    model, sp = _train("sparse", "rigl", 24)
    path = save_sparse(model, tmp_path / "cnn.safetensors", sp)
    x = torch.randn(4, 2, 8, 8)
    model.eval()
    expected = model(x)
    for backend in ("sparse", "masked"):  # into either backend, masks and values restored
        torch.manual_seed(1)
        other = _CNN()
        other_sp = rigl.create("static", other, None, sparsity=0.8, total_steps=24, backend=backend)
        load_sparse(path, other, other_sp)
        other.eval()
        torch.testing.assert_close(other(x), expected)
        for name, mask in sp.masks.items():
            assert torch.equal(other_sp.masks[name], mask), (backend, name)
    dense = _CNN()
    load_sparse(path, dense)  # a plain dense model takes the densified kernels
    dense.eval()
    torch.testing.assert_close(dense(x), expected)
    masked_run = rigl.create("static", _CNN(), None, sparsity=0.8, total_steps=24, backend="masked")
    sparse_run = rigl.create(
        "static", _CNN(), None, sparsity=0.8, total_steps=24, backend="sparse", seed=9
    )
    sparse_run.load_state_dict(masked_run.state_dict())  # a masked run's masks, compressed
    assert all(torch.equal(sparse_run.masks[k], m) for k, m in masked_run.masks.items())


def test_meta_convolutions_are_built_compressed_from_their_shapes():
    with torch.device("meta"):
        model = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv1d(64, 8, 3), nn.Flatten(),
            nn.Linear(8 * 6, 4),
        )  # fmt: skip
    model[2] = _Squeeze(model[2])  # (B, 64, 1, 8) -> (B, 64, 8) for the Conv1d
    sp = rigl.create("static", model, None, sparsity=0.9, total_steps=10, backend="sparse")
    assert not any(p.is_meta for p in model.parameters())
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2].conv, SparseConv1d)
    assert [w.n_active for w in sp.weights] == sp.target_counts
    bound = 1 / (3 * 9) ** 0.5  # nn.Conv2d's initialisation: U(-1/sqrt(fan_in), ...)
    assert 0.8 * bound < float(model[0].values.detach().abs().max()) <= bound
    assert model(torch.randn(2, 3, 1, 8)).shape == (2, 4)


class _Squeeze(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.squeeze(2))


def test_grouped_and_non_zero_padded_convolutions_stay_masked_and_say_why():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1),
        nn.Conv2d(4, 4, 4, padding="same"), nn.Conv2d(4, 4, 3, padding="same"),
    )  # fmt: skip
    sp = rigl.create(
        "static", model, None, sparsity=0.5, total_steps=10, backend="sparse",
        dense_grouped_convs=False,
    )  # fmt: skip
    rows = {r.name: r for r in sp.summary()}
    assert "grouped" in rows["0.weight"].note and "padding_mode" in rows["1.weight"].note
    assert "unevenly" in rows["2.weight"].note
    assert rows["3.weight"].backend == "sparse" and isinstance(model[3], SparseConv2d)
    assert rows["3.weight"].shape == (4, 4, 3, 3)  # the kernel's shape, as when masked
    assert [isinstance(w, SparseWeight) for w in sp.weights] == [False, False, False, True]


@pytest.mark.parametrize(
    "shape,dtype",
    [((2, 5, 7, 8), torch.float32), ((3, 7), torch.float32), ((2, 3, 7, 8), torch.float64),
     ((1, 3, 2, 2), torch.float32)],
)  # fmt: skip
def test_bad_inputs_get_the_errors_of_nn_conv2d(shape, dtype):
    conv, layer = _pair((3, 4, 3, 1, 0, 1, 0, 0), dtype=torch.float32)
    x = torch.randn(shape, dtype=dtype)
    with pytest.raises(RuntimeError) as dense_error:
        conv(x)
    with pytest.raises(RuntimeError) as sparse_error:
        layer(x)
    first = lambda e: str(e.value).split(":")[0].split("(")[0]  # noqa: E731
    assert first(sparse_error) == first(dense_error)


def test_a_failed_scratch_allocation_leaves_the_kernels_usable():
    """An input whose blocked copy cannot be allocated fails with an error, and the next
    ordinary call still works (the scratch slot forgets the failed size)."""
    if conv_kernels.extension() is None:
        pytest.skip("the C++ kernels did not build")
    mask = torch.ones(2, 2, 3, dtype=torch.bool)
    ok = SparseConv1d.from_dense(nn.Conv1d(2, 2, 3, padding=1).double(), mask)
    x = torch.randn(4, 2, 50, dtype=torch.float64)
    expected = ok(x)
    huge = SparseConv1d(1, 1, 1, stride=2**41, padding=2**40, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="out of memory"):
        huge(torch.randn(1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(ok(x), expected)


def test_compressed_convolutions_keep_no_csc_index():
    """The conv kernels read the CSR only: a layer stores no blocked CSC (4 bytes of index
    per active weight, not 12), after construction, a topology change and a load."""
    _, layer = _pair(GEOMETRIES[0], dtype=torch.float32)
    for step in ("built", "set_topology", "loaded"):
        if step == "set_topology":
            flat = layer.active_indices()[:-3]
            layer.set_topology(flat, torch.ones(flat.numel()))
        if step == "loaded":
            _, other = _pair(GEOMETRIES[0], dtype=torch.float32, seed=1)
            layer.load_state_dict(other.state_dict())
            torch.testing.assert_close(layer.weight, other.weight)
        for name in ("col_ptr", "row_idx", "perm"):
            assert getattr(layer, name).numel() == 0, (step, name)
        index_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
        assert index_bytes <= 4 * layer.values.numel() + 4 * (layer.out_channels + 1) + 8, step


def test_an_empty_batch_gives_empty_outputs_and_zero_gradients(sparse_kernels):
    """Zero images: an empty output and input gradient and an all-zero weight gradient, as
    torch's convolution gives (no kernel runs on an empty block)."""
    conv, layer = _pair(GEOMETRIES[0], dtype=torch.float32)
    x = torch.randn(0, 3, 7, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == conv(x).shape == (0, 5, 7, 8)
    dx, dvalues = torch.autograd.grad(y, (x, layer.values), torch.ones_like(y))
    assert dx.shape == x.shape
    assert torch.equal(dvalues, torch.zeros_like(layer.values))


def test_outputs_in_fresh_mappings_over_32_mib_are_computed_in_full(sparse_kernels):
    """An output of over 32 MiB is a fresh mapping on every call (glibc maps such blocks
    anew), whose pages the kernels fault in ahead with one madvise call: the output and the
    input gradient (the two such outputs) equal torch's, twice in a row, with nothing left
    unwritten. (The weight gradient, a float32 sum of 1.25M terms here, is left to the
    other tests.)"""
    conv, layer = _pair((8, 8, 3, 1, 1, 1, 96, 96), dtype=torch.float32, density=0.2)
    for _ in range(2):
        x = torch.randn(136, 8, 96, 96, requires_grad=True)  # 40 MB in and out
        assert x.numel() * x.element_size() > 32 * 2**20
        _assert_float32_products_match(conv, layer, x, weight_grad=False)


@pytest.mark.parametrize(
    "geometry, batch, density",
    [
        ((16, 24, 3, 1, 1, 1, 12, 12), 20, 0.3),  # 2 chunks; more row blocks, more threads
        ((6, 40, 3, 1, 1, 1, 64, 19), 2, 0.3),  # folded: 4 bands of 16 rows, 2 chunks of 8
        ((16, 24, 3, 2, 1, 2, 7, 12), 9, 0.3),  # strided, dilated, 3 output rows: one chunk
        ((40, 40, 5, 1, 2, 1, 40, 9), 9, 0.6),  # 4 chunks, row blocks of kWRows non-zeros
        ((8, 16, (1, 5), 1, (0, 2), 1, 1, 37), 3, 0.3),  # a 1-D convolution (height one)
    ],
)
def test_the_weight_gradient_is_the_same_bits_on_one_to_four_threads_in_any_task_layout(
    geometry, batch, density
):
    """Each active weight's gradient has one writer and one summation order, whatever the
    number of threads (data-parallel ranks and reruns agree bit for bit): the tasks (row
    blocks x chunks of output rows) differ with the threads, the bits do not. An ordinary
    batch, a folded small batch (the chunks of a band), fewer output rows than a chunk,
    blocks capped at kWRows non-zeros, and a 1-D convolution; on one thread the gradient
    equals torch's."""
    if conv_kernels.extension() is None:
        pytest.skip("the C++ kernels did not build")
    conv, layer = _pair(geometry, dtype=torch.float32, density=density)
    x = torch.randn(batch, geometry[0], *geometry[6:])
    dy = torch.randn_like(conv(x))
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(layer(x), layer.values, dy)[0])
    finally:
        torch.set_num_threads(threads)
    (dw_ref,) = torch.autograd.grad(conv(x), conv.weight, dy)
    torch.testing.assert_close(
        grads[0], dw_ref.reshape(-1)[layer.active_indices()], rtol=1e-4, atol=1e-4
    )
    for other in grads[1:]:
        assert torch.equal(grads[0], other)
