"""Products of the condensed (constant fan-in) layout: compiled == torch fallback == dense."""

from __future__ import annotations

import pytest
import torch

import rigl
from rigl.sparse import condensed_ops, kernels
from rigl.sparse.condensed import random_cols
from rigl.sparse.condensed_ops import CondensedIndex
from rigl.sparse.function import sparse_linear

BACKENDS = [
    "torch",
    pytest.param(
        "cpp",
        marks=pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build"),
    ),
]


def pattern(n_out, n_in, k, group=None, seed=0):
    """A random condensed pattern, its index, and a dense weight that is zero off it."""
    gen = torch.Generator().manual_seed(seed)
    cols = random_cols(n_out, n_in, k, group, gen)
    index = CondensedIndex.from_cols(cols, (n_out, n_in), group)
    dense = torch.zeros(n_out, n_in)
    dense.scatter_(1, cols, torch.randn(n_out, k, generator=gen))
    return index, dense, dense.gather(1, cols).reshape(-1)


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize(
    ("n_out", "n_in", "k", "group", "batch"),
    [
        (7, 5, 2, None, 1),
        (33, 20, 6, None, 70),  # a full 64-column chunk and a tail; k not a multiple of 8
        (64, 48, 17, None, 128),
        (16, 16, 16, None, 33),  # dense
        (40, 24, 12, 4, 200),  # 2:4
        (9, 32, 4, 8, 64),  # 1:8
        (66, 64, 16, 4, 130),  # 1:4, two threads: lockstep row blocks (8 AVX-512, 3 AVX2), rest
        (5, 12, 0, None, 9),  # no active input: bias only
    ],
)
def test_products_match_dense(use, n_out, n_in, k, group, batch):
    index, dense, values = pattern(n_out, n_in, k, group)
    gen = torch.Generator().manual_seed(1)
    xt = torch.randn(n_in, batch, generator=gen)
    dyt = torch.randn(n_out, batch, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    tol = {"rtol": 1e-4, "atol": 1e-4}

    yt = condensed_ops.forward(values, index, xt, bias, use=use)
    torch.testing.assert_close(yt, dense @ xt + bias[:, None], **tol)
    mask = dense != 0
    dw_dense = (dyt @ xt.t()).gather(1, index.col_idx.long()).reshape(-1)
    dxt, dw = condensed_ops.backward(values, index, xt, dyt, use=use)
    torch.testing.assert_close(dxt, dense.t() @ dyt, **tol)
    torch.testing.assert_close(dw, dw_dense, **tol)
    assert torch.equal(mask.sum(1), torch.full((n_out,), k))  # the pattern is condensed
    none, dw_only = condensed_ops.backward(values, index, xt, dyt, want_dx=False, use=use)
    dxt_only, none2 = condensed_ops.backward(values, index, xt, dyt, want_dw=False, use=use)
    assert none is None and none2 is None
    torch.testing.assert_close(dw_only, dw_dense, **tol)
    torch.testing.assert_close(dxt_only, dxt)


@pytest.mark.skipif(kernels.extension() is None, reason="C++ kernels did not build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_equals_fallback(dtype):
    index, _, values = pattern(70, 96, 29, seed=3)
    values = values.to(dtype)
    gen = torch.Generator().manual_seed(4)
    xt = torch.randn(96, 100, generator=gen, dtype=dtype)
    dyt = torch.randn(70, 100, generator=gen, dtype=dtype)
    fwd = [condensed_ops.forward(values, index, xt, None, use=u) for u in ("cpp", "torch")]
    dws = [condensed_ops.weight_grad(index, xt, dyt, use=u) for u in ("cpp", "torch")]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(fwd[0], fwd[1], **tol)
    torch.testing.assert_close(dws[0], dws[1], **tol)


@pytest.mark.parametrize("use", BACKENDS)
@pytest.mark.parametrize(("batch", "panel"), [(1, None), (3, None), (37, None), (37, 8)])
def test_gradcheck(use, batch, panel, monkeypatch):
    if panel:  # 37 rows in panels of 8 columns: 5 panels, the last one padded
        monkeypatch.setattr(kernels, "ONE_PANEL_UP_TO", panel)
        monkeypatch.setattr(kernels, "PANEL_WIDTH", panel)
    index, _, _ = pattern(9, 11, 4)
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(index.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(batch, 11, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: sparse_linear(x, v, index, b, use=use),
        (x, values, bias),
        fast_mode=batch > 8,  # random projections: the tail-chunk case stays cheap
    )
    # the weight gradient alone (an input that needs none: the row-wise dW path)
    x = x.detach()
    assert torch.autograd.gradcheck(lambda v: sparse_linear(x, v, index, None, use=use), (values,))


@pytest.mark.parametrize("use", BACKENDS)
def test_empty_batch_gives_zero_weight_gradient(use):
    index, _, values = pattern(6, 8, 3)
    xt, dyt = torch.empty(8, 0), torch.empty(6, 0)
    assert condensed_ops.forward(values, index, xt, None, use=use).shape == (6, 0)
    for want_dx in (True, False):
        dxt, dw = condensed_ops.backward(values, index, xt, dyt, want_dx=want_dx, use=use)
        assert torch.equal(dw, torch.zeros(18))
        assert dxt is None or dxt.shape == (8, 0)


@pytest.mark.parametrize("use", BACKENDS)
def test_operands_are_checked_before_the_kernels(use):
    index, _, values = pattern(6, 8, 3)
    xt, dyt = torch.randn(8, 4), torch.randn(6, 4)
    bad = [
        ({"xt": torch.randn(7, 4)}, "xt has 7 rows"),
        ({"xt": torch.randn(8, 4, dtype=torch.float64)}, "xt has dtype torch.float64"),
        ({"values": values[:-1]}, "values has shape"),
        ({"values": values.long()}, "values has dtype torch.int64"),
        ({"dyt": torch.randn(5, 4)}, "dyt has 5 rows"),
        ({"dyt": torch.randn(6, 3)}, "differ in batch size"),
        ({"xt": torch.tensor(1.0)}, "xt has 0 rows"),
    ]
    for change, message in bad:
        args = {"values": values, "xt": xt, "dyt": dyt, **change}
        with pytest.raises(ValueError, match=message):
            condensed_ops.backward(args["values"], index, args["xt"], args["dyt"], use=use)
        if "dyt" not in change:
            with pytest.raises(ValueError, match=message):
                condensed_ops.forward(args["values"], index, args["xt"], None, use=use)
    with pytest.raises(ValueError, match="bias"):
        condensed_ops.forward(values, index, xt, torch.randn(5), use=use)


def test_index_is_validated():
    shape = (3, 8)
    good = torch.tensor([[0, 3], [1, 7], [2, 4]])
    assert CondensedIndex.from_cols(good, shape).flat().tolist() == [0, 3, 9, 15, 18, 20]
    cases = [
        (torch.tensor([[0, 3], [1, 8], [2, 4]]), "column 8, outside"),
        (torch.tensor([[0, 3], [-1, 7], [2, 4]]), "column -1, outside"),
        (torch.tensor([[3, 0], [1, 7], [2, 4]]), "strictly increasing within row 0"),
        (torch.tensor([[0, 3], [1, 7], [4, 4]]), "strictly increasing within row 2"),
        (good.float(), "dtype torch.float32"),
        (good[:2], r"shape \(2, 2\)"),
    ]
    for cols, message in cases:
        with pytest.raises(rigl.ConfigError, match=message):
            CondensedIndex.from_cols(cols, shape)
    # 1:4: one active input in every group of four
    with pytest.raises(rigl.ConfigError, match="2 active inputs in group 0 of row 0.*1:4"):
        CondensedIndex.from_cols(torch.tensor([[0, 3], [1, 7], [2, 4]]), shape, group=4)
    ok = CondensedIndex.from_cols(torch.tensor([[0, 4], [1, 7], [3, 5]]), shape, group=4)
    assert ok.k == 2 and ok.group == 4


def test_index_from_flat_needs_equal_rows():
    with pytest.raises(ValueError, match="row 1 has 1 active inputs, row 0 has 2: a condensed"):
        CondensedIndex.from_flat(torch.tensor([0, 3, 9, 16, 17, 20]), (3, 8))
    with pytest.raises(ValueError, match="row 2 has 1 active inputs, row 0 has 2"):
        CondensedIndex.from_flat(torch.tensor([0, 3, 9, 12, 17]), (3, 8))
    with pytest.raises(ValueError, match="not sorted row-major"):
        CondensedIndex.from_flat(torch.tensor([0, 9, 3, 12, 17, 20]), (3, 8))


def test_random_cols_are_sorted_per_row_and_group():
    gen = torch.Generator().manual_seed(0)
    cols = random_cols(50, 64, 20, None, gen)
    assert cols.shape == (50, 20) and bool((cols[:, 1:] > cols[:, :-1]).all())
    nm = random_cols(50, 64, 32, 4, gen)  # 2:4
    assert torch.equal(
        (nm // 4).reshape(50, 16, 2), torch.arange(16)[None, :, None].expand(50, 16, 2)
    )
    assert bool((nm[:, 1:] > nm[:, :-1]).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_four_on_cuda_matches_dense(dtype):
    """The 2:4 forward through torch's semi-structured sparse kernels (where the GPU has
    them; elsewhere the general products run) equals the dense product."""
    index, dense, values = pattern(128, 128, 64, group=4)
    index, dense, values = index.to("cuda"), dense.to("cuda", dtype), values.to("cuda", dtype)
    xt = torch.randn(128, 64, device="cuda", dtype=dtype)
    yt = condensed_ops.forward(values, index, xt, None)
    torch.testing.assert_close(yt, dense @ xt, rtol=2e-2, atol=2e-2)
    dxt, _ = condensed_ops.backward(values, index, xt, yt)
    torch.testing.assert_close(dxt.float(), dense.t().float() @ yt.float(), rtol=3e-2, atol=3e-2)
