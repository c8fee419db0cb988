"""Which parameters are sparsified, and the include/exclude/first/last options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from conftest import TinyCNN, TinyGRU, TinyMLP


def _names(model, **options):
    return list(rigl.layer_densities(model, 0.9, "erk", **options))


def test_defaults_cover_linear_conv_rnn_but_not_depthwise_bias_norm():
    assert _names(TinyMLP()) == ["fc1.weight", "fc2.weight", "out.weight"]
    assert _names(TinyCNN()) == ["conv1.weight", "conv2.weight", "head.weight"]
    assert _names(TinyGRU()) == ["gru.weight_ih_l0", "gru.weight_hh_l0", "head.weight"]
    assert "depthwise.weight" in _names(TinyCNN(), dense_grouped_convs=False)


def test_embedding_on_request_and_attention_projections():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 8), "attn": nn.MultiheadAttention(8, 2)})
    assert _names(model) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert _names(model, sparse_embeddings=True)[0] == "emb.weight"


def test_include_exclude_first_last():
    assert _names(TinyMLP(), exclude=("out.*",)) == ["fc1.weight", "fc2.weight"]
    assert _names(TinyCNN(), exclude=("Conv2d",)) == ["head.weight"]
    dens = rigl.layer_densities(
        TinyMLP(), 0.9, "uniform", first_layer_dense=True, last_layer_dense=True
    )
    assert dens["fc1.weight"] == dens["out.weight"] == 1.0 and dens["fc2.weight"] < 0.2

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6))

    model = nn.Sequential(Custom(), nn.Linear(6, 2))
    assert _names(model, include=("Custom",)) == ["0.weight", "1.weight"]


def test_tied_weights_are_sparsified_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    assert _names(model) == ["0.weight"]


# -- targets that follow what a layer computes (issue 13 item 1) ---------------------------------
def test_hf_conv1d_is_a_linear_layer_with_its_weight_stored_in_out():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D(24, 12)  # nf=24 outputs, nx=12 inputs
    assert conv1d.weight.shape == (12, 24)
    model = nn.Sequential(conv1d, nn.ReLU(), nn.Linear(24, 4))
    twin = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4))
    densities = rigl.layer_densities(model, 0.8, "erk")
    assert list(densities) == ["0.weight", "2.weight"] == list(rigl.layer_densities(twin, 0.8))
    assert densities == rigl.layer_densities(twin, 0.8, "erk")  # ERK sees the same fans
    x = torch.randn(5, 12)
    flops = rigl.count_flops(model, x, densities)
    expected = rigl.count_flops(twin, x, rigl.layer_densities(twin, 0.8, "erk"))
    assert [r.flops_sparse for r in flops.layers] == [r.flops_sparse for r in expected.layers]
    assert flops.layers[0].flops_dense == 2 * 12 * 24  # in * out multiply-adds per example


def test_importing_rigl_does_not_import_transformers():
    import subprocess
    import sys

    code = "import rigl, rigl.sparse, sys; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "gmp", "snip"])
def test_packed_qkv_blocks_keep_their_own_exact_counts(method):
    """Gradients that favour v cannot move connections out of q and k: each block of the
    packed in_proj_weight is updated (or pruned) on its own, with its own count."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    optimizer = torch.optim.SGD(attn.parameters(), lr=1e-4)  # small: the scaled v stays finite
    sparsifier = rigl.create(
        method, attn, optimizer, sparsity=0.9, total_steps=12, update_interval=2,
        drop_fraction=0.5, exclude=("out_proj.weight",),
    )  # fmt: skip
    # ERK sees three 16x16 maps, not one 48x16 matrix
    (n_active,) = sparsifier.target_counts
    assert n_active == sum(rigl.active_counts([(16, 16)] * 3, 0.9, "erk"))
    weight = sparsifier.weights[0]
    assert weight.blocks == 3
    per_block = [n_active // 3] * 3
    for _ in range(12):
        optimizer.zero_grad()
        x = torch.randn(4, 5, 16)
        attn(x, x, x)[0].sum().backward()
        attn.in_proj_weight.grad[32:] *= 1e3  # v's gradients dwarf q's and k's
        sparsifier.step()
        counts = weight.mask.reshape(3, -1).sum(1).tolist()
        assert max(counts) - min(counts) <= 1  # gmp on its way: an even split
        sparsifier.check()
    assert sparsifier.update_count >= 1
    assert weight.mask.reshape(3, -1).sum(1).tolist() == per_block


def _wrapped(kind: str) -> nn.Module:
    import warnings

    from torch.nn.utils import parametrizations

    linear = nn.Linear(64, 8)  # wide rows: weight_norm divides by each row's norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-based helpers are deprecated
        wrap = {
            "weight_norm": parametrizations.weight_norm,
            "spectral_norm": parametrizations.spectral_norm,
            "hook_weight_norm": nn.utils.weight_norm,
            "hook_spectral_norm": nn.utils.spectral_norm,
        }[kind]
        return nn.Sequential(wrap(linear), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize(
    ("kind", "tensor"),
    [
        ("weight_norm", "0.parametrizations.weight.original1"),
        ("spectral_norm", "0.parametrizations.weight.original"),
        ("hook_weight_norm", "0.weight_v"),
        ("hook_spectral_norm", "0.weight_orig"),
    ],
)
def test_normalised_weights_are_sparsified_through_the_tensor_they_are_computed_from(kind, tensor):
    torch.manual_seed(0)
    model = _wrapped(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = rigl.create(
        "rigl", model, optimizer, sparsity=0.7, total_steps=12, update_interval=2,
        distribution="uniform",
    )  # fmt: skip
    assert list(sparsifier.masks) == [tensor, "2.weight"]
    assert "norm" in sparsifier.summary()[0].note
    for t in range(12):
        optimizer.zero_grad()
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(t))
        model(x).square().mean().backward()
        sparsifier.step()
    assert sparsifier.update_count > 0
    sparsifier.check()
    model(torch.randn(2, 64))  # the hook-based ones recompute .weight in the forward pass
    computed = model[0].weight  # what the layer multiplies by: zero where masked
    assert bool((computed[~sparsifier.masks[tensor]] == 0).all())
    assert int((computed != 0).sum()) == sparsifier.weights[0].n_active


def test_other_parametrizations_are_refused_naming_the_layer_and_the_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    nn.utils.parametrizations.orthogonal(model[0])
    with pytest.raises(rigl.ConfigError, match=r"0\.weight is computed by the parametrization"):
        rigl.layer_densities(model, 0.9)
    with pytest.raises(rigl.ConfigError, match=r"exclude=\('0\.weight',\)"):
        rigl.layer_densities(model, 0.9)
    assert list(rigl.layer_densities(model, 0.9, exclude=("0.weight",))) == ["2.weight"]
