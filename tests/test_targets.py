"""Which parameters are sparsified, and the include/exclude/first/last options."""

from __future__ import annotations

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
