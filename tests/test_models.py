"""The experiment model zoo: registry, faithful parameter counts, shapes, width scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rigl.experiments.models.zoo import (
    build_model,
    example_input,
    list_models,
    model_defaults,
    register_model,
)

ALL = [
    "char_gpt",
    "char_gru",
    "cnn1d",
    "lenet300_100",
    "mlp",
    "mobilenet_v1",
    "resnet18",
    "resnet50",
    "wrn",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kw) -> nn.Module:
    defaults = model_defaults(name)
    kw = {"num_classes": defaults["num_classes"], "input_shape": defaults["input_shape"]} | kw
    with torch.device("meta"):
        return build_model(name, **kw)


def test_registry_lists_every_model() -> None:
    assert list_models() == ALL


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet50.*wrn"):
        build_model("vgg", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        model_defaults("vgg")


def test_duplicate_registration_and_bad_width_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda **kw: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", num_classes=10, input_shape=(784,), width=0)


@pytest.mark.parametrize(
    ("name", "kw", "expected"),
    [
        ("resnet50", {}, 25_557_032),  # torchvision / Keras ResNet-50: 25.56M
        ("resnet18", {}, 11_689_512),
        ("mobilenet_v1", {}, 4_231_976),  # Keras MobileNet 1.0-224 trainable params: 4.23M
        ("wrn", {}, 1_079_642),  # WRN-22-2 on CIFAR-10: ~1.1M
        ("lenet300_100", {}, 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
    ],
)
def test_parameter_counts_are_faithful(name: str, kw: dict, expected: int) -> None:
    assert n_params(on_meta(name, **kw)) == expected


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes(name: str) -> None:
    defaults = model_defaults(name)
    shape = defaults["input_shape"]
    if name in ("resnet18", "resnet50", "mobilenet_v1"):
        shape = (3, 32, 32)  # any size works after global pooling; small for speed
    if name in ("char_gru", "char_gpt"):  # sequence models: (B, T) -> (B, T, vocab)
        shape = (12,)
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, width=0.25)
    x = example_input(name, shape, batch=2)
    out = model(x)
    expected = (2, shape[0], 7) if name in ("char_gru", "char_gpt") else (2, 7)
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_char_gru_takes_int64_tokens() -> None:
    x = example_input("char_gru", (16,), batch=3)
    assert x.dtype == torch.int64
    model = build_model("char_gru", num_classes=50, input_shape=(16,), hidden_size=32)
    assert model(x).shape == (3, 16, 50)
    assert model.gru.hidden_size == 32


def test_cnn1d_accepts_flat_and_channel_inputs() -> None:
    model = build_model("cnn1d", num_classes=10, input_shape=(40,))
    assert model(torch.randn(4, 40)).shape == (4, 10)
    assert model(torch.randn(4, 1, 40)).shape == (4, 10)


def test_mlp_hidden_sizes_option() -> None:
    model = build_model("mlp", num_classes=3, input_shape=(1, 4, 4), hidden_sizes=(8, 6, 5))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 6), (6, 5), (5, 3)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v1", "wrn", "lenet300_100"])
def test_width_scales_hidden_sizes_only(name: str) -> None:
    defaults = model_defaults(name)
    wide, narrow = on_meta(name), on_meta(name, width=0.5)
    assert n_params(narrow) < 0.55 * n_params(wide)
    layers = [m for m in narrow.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    first, last = layers[0], layers[-1]
    assert first.weight.shape[1] == wide.get_submodule(_first_name(wide)).weight.shape[1]
    assert last.weight.shape[0] == defaults["num_classes"]  # output size never scales
    assert first.weight.shape[0] == round(
        wide.get_submodule(_first_name(wide)).weight.shape[0] * 0.5
    )


def _first_name(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d))


def test_resnet_stems() -> None:
    imagenet = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    cifar = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), stem="cifar")
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet50", num_classes=10, input_shape=(3, 32, 32), stem="tiny")


def test_mobilenet_layout_and_cifar_stem() -> None:
    model = build_model("mobilenet_v1", num_classes=10, input_shape=(3, 32, 32), stem="cifar")
    assert model.features[0][0].stride == (1, 1)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_wrn_depth_and_widen_options() -> None:
    model = on_meta("wrn", depth=16, widen=4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert max(m.out_channels for m in convs) == 256
    with pytest.raises(ValueError, match="6n\\+4"):
        build_model("wrn", num_classes=10, input_shape=(3, 32, 32), depth=20)
