"""Kernels of rigl.sparse: compiled and torch fallback against dense references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rigl.sparse import kernels
from rigl.sparse.function import sparse_linear
from rigl.sparse.index import SparseIndex

BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build"),
    ),
]


def random_pattern(shape, density, seed=0, empty_rows=(), empty_cols=()):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    mask[list(empty_rows), :] = False
    mask[:, list(empty_cols)] = False
    return mask


def index_of(mask, block_nnz=37):  # small blocks: several CSC blocks even in tiny tests
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return SparseIndex.from_flat(flat, tuple(mask.shape), block_nnz)[0]


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize(
    ("n_out", "n_in", "batch", "density"),
    [(7, 5, 1, 0.5), (33, 20, 70, 0.3), (64, 48, 128, 0.05), (16, 16, 33, 1.0), (40, 24, 200, 0.2)],
)
def test_products_match_dense(use, n_out, n_in, batch, density):
    mask = random_pattern((n_out, n_in), density, empty_rows=(1,), empty_cols=(2,))
    if density == 1.0:
        mask[:] = True
    index = index_of(mask)
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(n_out, n_in, generator=gen) * mask
    values = dense[mask]  # row-major, as the index stores them
    xt = torch.randn(n_in, batch, generator=gen)
    dyt = torch.randn(n_out, batch, generator=gen)
    bias = torch.randn(n_out, generator=gen)

    yt = kernels.forward(values, index, xt, bias, use=use)
    torch.testing.assert_close(yt, dense @ xt + bias[:, None], rtol=1e-4, atol=1e-4)
    dxt, dw = kernels.backward(values, index, xt, dyt, use=use)
    torch.testing.assert_close(dxt, dense.t() @ dyt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, (dyt @ xt.t())[mask], rtol=1e-4, atol=1e-4)
    dxt_only, none = kernels.backward(values, index, xt, dyt, want_dw=False, use=use)
    none2, dw_only = kernels.backward(values, index, xt, dyt, want_dx=False, use=use)
    assert none is None and none2 is None
    torch.testing.assert_close(dxt_only, dxt)
    torch.testing.assert_close(dw_only, dw)


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize(("batch", "panel"), [(1, None), (3, None), (37, None), (37, 8)])
def test_gradcheck(use, batch, panel, monkeypatch):
    if panel:  # 37 rows in panels of 8 columns: 5 panels, the last one padded
        monkeypatch.setattr(kernels, "ONE_PANEL_UP_TO", panel)
        monkeypatch.setattr(kernels, "PANEL_WIDTH", panel)
    mask = random_pattern((9, 11), 0.4, empty_rows=(3,))
    index = index_of(mask)
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(index.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(batch, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: sparse_linear(x, v, index, b, use=use),
        (x, values, bias),
        fast_mode=batch > 8,  # random projections: the tail-chunk case stays cheap
    )


def test_empty_pattern_gives_bias():
    index = index_of(torch.zeros(4, 3, dtype=torch.bool))
    xt = torch.randn(3, 5)
    bias = torch.arange(4.0)
    for use in ("torch", None):
        yt = kernels.forward(torch.zeros(0), index, xt, bias, use=use)
        torch.testing.assert_close(yt, bias[:, None].expand(4, 5))


def test_index_rejects_duplicates_and_out_of_range():
    with pytest.raises(ValueError, match="duplicate"):
        SparseIndex.from_flat(torch.tensor([3, 3]), (2, 2))
    with pytest.raises(ValueError, match="out of range"):
        SparseIndex.from_flat(torch.tensor([4]), (2, 2))


@pytest.mark.parametrize("use", BACKENDS)
def test_index_orders_are_consistent(use):
    mask = random_pattern((13, 17), 0.3)
    flat = mask.reshape(-1).nonzero().squeeze(1)
    index = SparseIndex.from_flat(flat, (13, 17), 37, use=use)[0]
    rows, cols = mask.nonzero().unbind(1)
    assert torch.equal(index.rows(), rows)
    assert torch.equal(index.col_idx.long(), cols)
    perm = index.perm.long()
    assert index.n_blocks > 1
    assert torch.equal(index.row_idx.long(), rows[perm])
    block = torch.bucketize(rows[perm], index.block_rows[1:-1].long(), right=True)
    keys = (block * 17 + cols[perm]) * 13 + rows[perm]
    assert bool((keys[1:] > keys[:-1]).all())
    col_ptr = index.col_ptr.reshape(index.n_blocks, 18).long()
    for b in range(index.n_blocks):
        for i in range(17):
            seg = slice(int(col_ptr[b, i]), int(col_ptr[b, i + 1]))
            assert bool((cols[perm[seg]] == i).all()) and bool((block[seg] == b).all())
    assert all(t.dtype == torch.int32 for t in index.tensors().values())


@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
@pytest.mark.parametrize(
    ("shape", "density", "block_nnz"),
    [((2, 2), 1.0, 1), ((50, 3000), 0.01, 16), ((300, 200), 0.2, 1000), ((64, 64), 0.0, 8)],
)
def test_compiled_and_torch_indices_are_equal(shape, density, block_nnz):
    mask = random_pattern(shape, density, seed=3, empty_rows=(0,), empty_cols=(1,))
    flat = mask.reshape(-1).nonzero().squeeze(1)
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(1))]
    a, order_a = SparseIndex.from_flat(flat, shape, block_nnz, use="cpp")
    b, order_b = SparseIndex.from_flat(flat, shape, block_nnz, use="torch")
    assert torch.equal(order_a, order_b)
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name


def test_env_var_forces_torch_fallback():
    code = "from rigl.sparse import kernels; print(kernels.backend())"
    env = {**os.environ, "RIGL_SPARSE_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 5), (33, 70), (64, 128), (40, 7)])
def test_transpose(use, shape):
    a = torch.randn(shape)
    torch.testing.assert_close(kernels.transpose(a, use=use), a.t().contiguous(), rtol=0, atol=0)
    assert kernels.transpose(a, use=use).is_contiguous()


# -- operands the compiled kernels must not trust (issue 12, items 5, 6, 8) -----------------
@pytest.mark.parametrize("use", BACKENDS)
def test_empty_batch_gives_zero_weight_gradient(use):
    index = index_of(random_pattern((33, 20), 0.5))
    values = torch.randn(index.nnz)
    for _ in range(3):
        junk = torch.full((index.nnz,), float("nan"))  # garbage for an unwritten output
        del junk
        yt = kernels.forward(values, index, torch.randn(20, 0), None, use=use)
        dxt, dw = kernels.backward(values, index, torch.randn(20, 0), torch.randn(33, 0), use=use)
        assert yt.shape == (33, 0) and dxt.shape == (20, 0)
        assert torch.equal(dw, torch.zeros_like(values))


@pytest.mark.parametrize("use", BACKENDS)
def test_operands_are_checked_before_the_kernels(use):
    index = index_of(random_pattern((8, 16), 0.5))
    values, xt = torch.randn(index.nnz), torch.randn(16, 4)
    bad = {
        "xt has 15 rows": lambda: kernels.forward(values, index, torch.randn(15, 4), None, use=use),
        "dyt has 9 rows": lambda: kernels.backward(values, index, xt, torch.randn(9, 4), use=use),
        "batch": lambda: kernels.backward(values, index, xt, torch.randn(8, 5), use=use),
        "values has": lambda: kernels.forward(values[:-1], index, xt, None, use=use),
        "dtype": lambda: kernels.forward(values, index, xt.double(), None, use=use),
        "supported": lambda: kernels.forward(values.long(), index, xt.long(), None, use=use),
        "bias": lambda: kernels.forward(values, index, xt, torch.randn(7), use=use),
        "device": lambda: kernels.forward(values, index, xt.to("meta"), None, use=use),
    }
    for match, call in bad.items():
        with pytest.raises((ValueError, RuntimeError), match=match):
            call()
    # a non-contiguous xt is made contiguous, not misread
    xt_strided = torch.randn(4, 16).t()
    torch.testing.assert_close(
        kernels.forward(values, index, xt_strided, None, use=use),
        kernels.forward(values, index, xt_strided.contiguous(), None, use=use),
    )
    dense = torch.zeros(8, 16)
    dense.view(-1)[index.flat()] = values
    dyt_strided = torch.randn(4, 8).t()
    dxt, _ = kernels.backward(values, index, xt_strided, dyt_strided, use=use)
    torch.testing.assert_close(dxt, dense.t() @ dyt_strided)


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_products_accumulate_in_float32(use, dtype):
    mask = random_pattern((40, 300), 0.5)
    index = index_of(mask, block_nnz=1000)
    gen = torch.Generator().manual_seed(1)
    dense = (torch.randn(40, 300, generator=gen) * mask).to(dtype)
    xt, dyt = torch.randn(300, 70, generator=gen).to(dtype), torch.randn(40, 70, generator=gen)
    dyt = dyt.to(dtype)
    yt = kernels.forward(dense[mask], index, xt, None, use=use)
    dxt, dw = kernels.backward(dense[mask], index, xt, dyt, use=use)
    assert yt.dtype == dxt.dtype == dw.dtype == dtype
    # Products of bf16/fp16 values are exact in float32 and the sums are accumulated
    # there: what is left is the one final rounding to the low-precision dtype.
    exact = dense.double() @ xt.double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(yt.double(), exact, rtol=eps, atol=1e-5)
    torch.testing.assert_close(dxt.double(), dense.double().t() @ dyt.double(), rtol=eps, atol=1e-5)
    dw_exact = (dyt.double() @ xt.double().t())[mask]
    torch.testing.assert_close(dw.double(), dw_exact, rtol=eps, atol=1e-5)
    a = torch.randn(33, 70).to(dtype)
    assert torch.equal(kernels.transpose(a, use=use), a.t().contiguous())


# -- building the kernels (issue 12, item 17) ---------------------------------------------------
def test_cache_key_follows_source_flags_and_cpu(tmp_path, monkeypatch):
    key = kernels._cache_key()
    assert key == kernels._cache_key()
    copy = tmp_path / "sparse_linear.cpp"
    copy.write_bytes(kernels._SOURCE.read_bytes())
    monkeypatch.setattr(kernels, "_SOURCE", copy)
    assert kernels._cache_key() == key  # the content counts, not the install's path
    copy.write_bytes(copy.read_bytes() + b"\n// edited\n")
    edited = kernels._cache_key()
    assert edited != key
    monkeypatch.setattr(kernels, "_CFLAGS", [*kernels._CFLAGS, "-DRIGL_CHUNK_FWD=32"])
    assert kernels._cache_key() not in (key, edited)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: "fpu sse avx512f")
    assert len({key, edited, kernels._cache_key()}) == 3


def _fresh_extension(monkeypatch, tmp_path, load):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RIGL_SPARSE_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(cpp_extension, "load", load)


def test_a_first_build_says_so_once_and_names_the_cache(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_load(name, sources, build_directory, **kwargs):
        calls.append((name, build_directory))
        return "module"

    _fresh_extension(monkeypatch, tmp_path, fake_load)
    assert kernels.extension() == "module"
    assert kernels.extension() == "module"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "compiling" in err and "once" in err and "few minutes" in err
    ((name, folder),) = calls
    assert name == f"rigl_sparse_linear_{kernels._cache_key()}"
    assert folder == str(tmp_path / name) and folder in err


def test_a_build_leaves_the_cache_key_as_it_was(tmp_path, monkeypatch):
    """torch's load appends its flags to the lists it is given: ours must not change (the
    key of every later build in the process would, and the extension would be rebuilt)."""

    def appending_load(name, sources, build_directory, extra_cflags, extra_ldflags, **kwargs):
        extra_cflags.append("-DADDED")
        extra_ldflags.append("-ltorch")
        return "module"

    key = kernels._cache_key()
    _fresh_extension(monkeypatch, tmp_path, appending_load)
    assert kernels.extension() == "module"
    assert kernels._cache_key() == key


@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
def test_a_built_extension_is_loaded_without_the_build_tools(monkeypatch, capsys):
    from torch.utils import cpp_extension

    folder = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_tried", False)
    if kernels.extension() is None:  # built here if no earlier test did (a fresh machine)
        pytest.skip("the compiled kernels cannot be built on this machine")
    capsys.readouterr()
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: pytest.fail("rebuilt"))
    ext = kernels.extension()
    assert ext is not None and hasattr(ext, "forward")
    assert capsys.readouterr().err == ""
    assert os.path.dirname(ext.__file__).startswith(os.path.realpath(folder))


# -- panels: batches of more than kernels.ONE_PANEL_UP_TO rows ------------------------------
@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("n", "f", "width"), [(210, 33, 64), (256, 40, 64), (5, 7, 2), (9, 1, 4)])
def test_panels_round_trip_and_zero_padding(dtype, n, f, width):
    a = torch.randn(n, f).to(dtype)
    panels = kernels.to_panels(a, width)
    n_panels = -(-n // width)
    assert panels.shape == (n_panels, f, width)
    for p in range(n_panels):  # panel p is rows p * width ... transposed, then zeros
        rows = a[p * width : (p + 1) * width]
        assert torch.equal(panels[p, :, : len(rows)], rows.t())
        assert not panels[p, :, len(rows) :].any()
    back = kernels.from_panels(panels, n)
    assert back.is_contiguous() and torch.equal(back, a)
    if width < n:  # the bias-gradient pass: the same panels and the column sums
        same, sums = kernels.to_panels_and_sums(a, width)
        assert torch.equal(same, panels)
        torch.testing.assert_close(
            sums, a.sum(0), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5
        )


def test_panel_width_keeps_small_batches_in_one_panel(monkeypatch):
    monkeypatch.setattr(kernels, "ONE_PANEL_UP_TO", 256)
    monkeypatch.setattr(kernels, "PANEL_WIDTH", 64)
    assert kernels.panel_width(256) == 256  # one panel: the plain transpose
    assert kernels.to_panels(torch.randn(256, 3)).shape == (3, 256)
    assert kernels.panel_width(257) == 64
    if kernels.extension() is not None:
        assert kernels.to_panels(torch.randn(257, 3)).shape == (5, 3, 64)


def _layers(kind):
    from rigl.sparse import CondensedLinear, SparseLinear

    gen = torch.Generator().manual_seed(0)
    if kind == "unstructured":
        layer = SparseLinear(48, 37, density=0.2, generator=gen)  # 37: a group of 5 rows
    else:
        pattern = {"fanin": {"fan_in": 5}, "2:4": {"nm": "2:4"}}[kind]
        layer = CondensedLinear(48, 37, generator=gen, **pattern)
    return layer, layer.to_dense()


@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
@pytest.mark.parametrize("kind", ["unstructured", "fanin", "2:4"])
def test_a_batch_in_panels_matches_the_dense_layer(monkeypatch, kind):
    """A batch of 3 x 70 = 210 rows in panels of 64 (the last one 18 rows and zero
    padding): output (row-major, as nn.Linear's), input and weight gradients, bias gradient
    and the grow scores (dense gradient by rows and at positions) equal the dense layer's."""
    monkeypatch.setattr(kernels, "ONE_PANEL_UP_TO", 64)
    monkeypatch.setattr(kernels, "PANEL_WIDTH", 64)
    sparse, dense = _layers(kind)
    x = torch.randn(3, 70, 48)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    sparse.keep_grow_inputs(True)
    ys, yd = sparse(xs), dense(xd)
    assert ys.is_contiguous()  # panels come back row-major
    torch.testing.assert_close(ys, yd, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(yd)
    ys.backward(dy)
    yd.backward(dy)
    assert sparse._grow.xts[0].shape == (4, 48, 64)  # the backward saw panels
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-4, atol=1e-5)
    mask = dense.weight.detach() != 0
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        sparse.grad_rows(3, 17), dense.weight.grad[3:17], rtol=1e-4, atol=1e-5
    )
    flat = torch.tensor([0, 7, 500, 1775])
    torch.testing.assert_close(
        sparse.grad_at(flat), dense.weight.grad.reshape(-1)[flat], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("use", BACKENDS)
def test_products_take_panels_as_the_transposed_batch(use):
    """The products on panels (n_panels, in, width) give the panels of the products on the
    plain feature-major batch, on the compiled kernels and the torch fallback alike."""
    mask = random_pattern((30, 20), 0.3)
    index = index_of(mask)
    values = torch.randn(int(mask.sum()))
    bias = torch.randn(30)
    x, dy = torch.randn(100, 20), torch.randn(100, 30)
    xp = torch.zeros(4, 20, 32)
    dyp = torch.zeros(4, 30, 32)
    for p in range(4):
        xp[p, :, : len(x[32 * p : 32 * (p + 1)])] = x[32 * p : 32 * (p + 1)].t()
        dyp[p, :, : len(dy[32 * p : 32 * (p + 1)])] = dy[32 * p : 32 * (p + 1)].t()
    yt = kernels.forward(values, index, x.t().contiguous(), bias, use=use)
    yp = kernels.forward(values, index, xp, bias, use=use)
    dxt, dw = kernels.backward(values, index, x.t().contiguous(), dy.t().contiguous(), use=use)
    dxp, dwp = kernels.backward(values, index, xp, dyp, use=use)
    y = kernels.forward(values, index, xp, bias, use=use, rows=100)  # row-major, directly
    assert y.shape == (100, 30) and y.is_contiguous()
    torch.testing.assert_close(y, yt.t())
    dx, dw_rows = kernels.backward(values, index, xp, dyp, use=use, rows=100)
    assert dx.shape == (100, 20) and dx.is_contiguous()
    torch.testing.assert_close(dx, dxt.t())
    torch.testing.assert_close(dw_rows, dw, rtol=1e-5, atol=1e-5)
    for p in range(4):
        cols = slice(32 * p, min(100, 32 * (p + 1)))
        width = cols.stop - cols.start
        torch.testing.assert_close(yp[p, :, :width], yt[:, cols])
        torch.testing.assert_close(dxp[p, :, :width], dxt[:, cols])
    torch.testing.assert_close(dwp, dw, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
@pytest.mark.parametrize(
    ("n_in", "n_out", "density", "dtype"),
    [
        (0, 5, 1.0, torch.float32),  # no inputs: the output is the bias
        (7, 0, 1.0, torch.float32),  # no outputs
        (9, 6, 0.0, torch.float32),  # no active weight
        (9, 6, 0.5, torch.float64),
        (9, 6, 0.5, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("panels", [True, False])
def test_edge_layers_match_dense(monkeypatch, n_in, n_out, density, dtype, panels):
    """Empty weights, empty sides (nn.Linear takes them: the output is the bias) and every
    dtype, 300 rows in panels of 64 or in one panel: the dense layer's output and
    gradients."""
    from rigl.sparse import SparseLinear

    if panels:
        monkeypatch.setattr(kernels, "ONE_PANEL_UP_TO", 64)
        monkeypatch.setattr(kernels, "PANEL_WIDTH", 64)
    sparse = SparseLinear(n_in, n_out, density=density, generator=torch.Generator().manual_seed(0))
    sparse = sparse.to(dtype)
    dense = sparse.to_dense()
    x = torch.randn(300, n_in).to(dtype)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), dense(xd)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(ys, yd, **tol)
    dy = torch.randn_like(yd)
    ys.backward(dy)
    yd.backward(dy)
    torch.testing.assert_close(xs.grad, xd.grad, **tol)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **tol)
    mask = dense.weight.detach() != 0
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], **tol)


@pytest.mark.parametrize("use", BACKENDS)
def test_panels_of_the_wrong_shape_are_refused_before_the_kernels(use):
    """Panels whose features do not fit the weight, or an output gradient in another
    layout or panel count than the input's, get a ValueError naming the operand."""
    index = index_of(random_pattern((6, 5), 0.5))
    values = torch.randn(index.nnz)
    xp, dyp = torch.zeros(3, 5, 8), torch.zeros(3, 6, 8)
    with pytest.raises(ValueError, match="xt has 4 rows"):
        kernels.forward(values, index, torch.zeros(3, 4, 8), None, use=use)
    with pytest.raises(ValueError, match="differ in batch size or panels"):
        kernels.backward(values, index, xp, torch.zeros(6, 24), use=use)
    with pytest.raises(ValueError, match="differ in batch size or panels"):
        kernels.backward(values, index, xp, torch.zeros(2, 6, 8), use=use)
    dx, _ = kernels.backward(values, index, xp, dyp, use=use)  # the right ones pass
    assert dx.shape == (3, 5, 8)
