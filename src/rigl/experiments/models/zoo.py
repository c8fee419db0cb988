"""Model zoo for the experiments, chosen by name (timm-style registry).

``build_model(name, num_classes=..., input_shape=..., width=1.0)`` builds one of the
networks of the RigL paper (Evci et al. 2020) or a CPU-sized stand-in. ``width``
multiplies every hidden width / channel count (Small-Dense: a narrower dense net with
the parameter count of a sparse one; Big-Sparse: a wider sparse net at the FLOPs of the
dense one); input and output sizes never scale. Parameter counts at ``width=1``:

=================  ============================  ==========
model              setting                       params
=================  ============================  ==========
lenet300_100       784 inputs, 10 classes        266,610
wrn (WRN-22-2)     CIFAR-10, 10 classes          1,079,642
resnet18           ImageNet, 1000 classes        11,689,512
resnet50           ImageNet, 1000 classes        25,557,032
mobilenet_v1       ImageNet, 1000 classes        4,231,976
=================  ============================  ==========
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rigl.config import ConfigError

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (784,),
    dtype: torch.dtype = torch.float32,
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``fn(*, num_classes, input_shape, width, **kw)``.

    ``num_classes``, ``input_shape`` and the input ``dtype`` are the model's usual
    setting, returned by :func:`model_defaults` (used by the CLI when none is given).
    """

    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        _DEFAULTS[name] = {"num_classes": num_classes, "input_shape": input_shape, "dtype": dtype}
        return fn

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _check(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")


def model_defaults(name: str) -> dict[str, Any]:
    """``{"num_classes", "input_shape", "dtype"}`` of the model's usual setting."""
    _check(name)
    return dict(_DEFAULTS[name])


def model_options(name: str) -> dict[str, Any]:
    """The model's own options (``model_options`` of a config): {keyword: default}."""
    _check(name)
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in ("num_classes", "input_shape", "width")
    }


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """ConfigError unless every key of ``options`` is an option of model ``name`` with a
    value of its default's type (ints for floats; a list or tuple for a tuple)."""
    accepted = model_options(name)
    listing = ", ".join(f"{k} (default {_plain(v)})" for k, v in accepted.items())
    listing = f"its options: {listing}" if accepted else "it takes no options"
    for key, value in options.items():
        if key not in accepted:
            raise ConfigError(
                f"model_options: {key!r} is not an option of model {name!r}; {listing}"
            )
        expected = _expected_type(accepted[key])
        if expected is not None and not _has_type(value, accepted[key]):
            raise ConfigError(
                f"model_options.{key}={value!r} has the wrong type for model {name!r}: "
                f"expected {expected}; {listing}"
            )


def _plain(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else repr(value)


def _expected_type(default: Any) -> str | None:
    if default is None or default is inspect.Parameter.empty:
        return None  # no default to compare with: the builder checks the value
    if isinstance(default, list | tuple):
        inner = _expected_type(default[0]) if default else None
        return f"a list of {inner}" if inner else "a list"
    return "a number" if isinstance(default, float) else type(default).__name__


def _has_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple) and all(
            not default or _has_type(v, default[0]) for v in value
        )
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def example_input(name: str, input_shape: Sequence[int], batch: int = 1, device=None):
    """A zero batch the model accepts: float images/vectors, or int64 tokens."""
    _check(name)
    return torch.zeros((batch, *input_shape), dtype=_DEFAULTS[name]["dtype"], device=device)


def build_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    width: float = 1.0,
    **kw: object,
) -> nn.Module:
    """Build the registered model ``name``; ``input_shape`` excludes the batch dimension."""
    _check(name)
    if not width > 0:
        raise ValueError(f"width={width!r} must be > 0")
    return _REGISTRY[name](
        num_classes=num_classes, input_shape=tuple(input_shape), width=width, **kw
    )


def scaled(channels: int, width: float) -> int:
    """A hidden width scaled by ``width``, rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


# ---------------------------------------------------------------- fully connected


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear head."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_features, h), nn.ReLU()]
            in_features = h
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, *input_shape) -> (B, classes)
        return self.head(self.hidden(x.flatten(1)))


@register_model("mlp")
def mlp(*, num_classes, input_shape, width, hidden_sizes=(256, 256)) -> nn.Module:
    return MLP(math.prod(input_shape), [scaled(h, width) for h in hidden_sizes], num_classes)


@register_model("lenet300_100")
def lenet300_100(*, num_classes, input_shape, width) -> nn.Module:
    """The MNIST MLP of the paper: 784-300-100-10 (its output layer is kept dense)."""
    return mlp(
        num_classes=num_classes, input_shape=input_shape, width=width, hidden_sizes=(300, 100)
    )


# ---------------------------------------------------------------- MNIST-1D CNN


class CNN1d(nn.Module):
    """Three stride-2 Conv1d + ReLU layers and a linear head over the flattened features."""

    def __init__(self, length: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for _ in range(3):
            length = (length + 1) // 2  # every conv above halves the length, rounding up
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) or (B, 1, L) -> (B, classes)
        h = x.reshape(x.shape[0], 1, -1)
        for conv in (self.conv1, self.conv2, self.conv3):
            h = torch.relu(conv(h))  # (B, C, L/2), (B, C, L/4), (B, C, L/8)
        return self.head(h.flatten(1))


@register_model("cnn1d", input_shape=(40,))
def cnn1d(*, num_classes, input_shape, width, channels=32) -> nn.Module:
    """Small 1-D CNN for MNIST-1D signals of shape (40,) (or (1, 40))."""
    return CNN1d(input_shape[-1], scaled(channels, width), num_classes)


# ---------------------------------------------------------------- WideResNet (CIFAR)


class WideBasic(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3 with a 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(h)
        out = self.conv1(h)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int, widths: Sequence[int], in_ch: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth={depth} must be 6n+4 (e.g. 16, 22, 28)")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        c = widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBasic(c, c_out, 2 if (i == 0 and stage > 0) else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, classes)
        h = torch.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


@register_model("wrn", input_shape=(3, 32, 32))
def wrn(*, num_classes, input_shape, width, depth=22, widen=2) -> nn.Module:
    """WRN-depth-widen (Zagoruyko & Komodakis 2016); WRN-22-2 is the paper's CIFAR-10 net."""
    widths = [scaled(c, width) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
    return WideResNet(depth, widths, input_shape[0], num_classes)


# ---------------------------------------------------------------- ResNets (ImageNet)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as in ResNet v1.5 and the TF TPU model) -> 1x1 (x4)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _projection(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def _projection(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


def _stem(in_ch: int, c_out: int, stem: str) -> tuple[nn.Conv2d, nn.Module]:
    """ImageNet stem: 7x7/2 conv + 3x3/2 max-pool; CIFAR stem: 3x3/1 conv, no pooling."""
    if stem == "imagenet":
        return nn.Conv2d(in_ch, c_out, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
    if stem == "cifar":
        return nn.Conv2d(in_ch, c_out, 3, 1, 1, bias=False), nn.Identity()
    raise ValueError(f"stem={stem!r}; valid: 'imagenet', 'cifar'")


class ResNet(nn.Module):
    def __init__(self, block, layers, widths, in_ch: int, num_classes: int, stem: str) -> None:
        super().__init__()
        self.conv1, self.maxpool = _stem(in_ch, widths[0], stem)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths[1:], strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(c, planes, 2 if (j == 0 and i > 0) else 1))
                c = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        h = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(h.mean(dim=(2, 3)))


def _resnet(block, layers, *, num_classes, input_shape, width, stem) -> nn.Module:
    widths = [scaled(c, width) for c in (64, 64, 128, 256, 512)]
    return ResNet(block, layers, widths, input_shape[0], num_classes, stem)


@register_model("resnet18", num_classes=1000, input_shape=(3, 224, 224))
def resnet18(*, num_classes, input_shape, width, stem="imagenet") -> nn.Module:
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes,
                   input_shape=input_shape, width=width, stem=stem)  # fmt: skip


@register_model("resnet50", num_classes=1000, input_shape=(3, 224, 224))
def resnet50(*, num_classes, input_shape, width, stem="imagenet") -> nn.Module:
    """ResNet-50 (He et al. 2016), 4.1 GMACs at 224x224; the paper's ImageNet model."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes,
                   input_shape=input_shape, width=width, stem=stem)  # fmt: skip


# ---------------------------------------------------------------- MobileNet v1


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """Howard et al. 2017: a 3x3 conv then 13 depthwise-separable blocks, avg-pool, FC.

    ``features.0`` is the first conv; in block ``features.i`` (i >= 1) the depthwise conv
    is ``features.i.0.0`` and the pointwise (1x1) conv ``features.i.1.0``.
    """

    # (output channels, stride) of the 13 depthwise-separable blocks
    BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
              (1024, 2), (1024, 1))  # fmt: skip

    def __init__(self, in_ch: int, num_classes: int, width: float, stem: str) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem={stem!r}; valid: 'imagenet', 'cifar'")
        c = scaled(32, width)
        layers: list[nn.Module] = [_conv_bn(in_ch, c, 3, 2 if stem == "imagenet" else 1)]
        for c_out, stride in self.BLOCKS:
            c_out = scaled(c_out, width)
            layers.append(
                nn.Sequential(_conv_bn(c, c, 3, stride, groups=c), _conv_bn(c, c_out, 1, 1))
            )
            c = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, classes)
        return self.fc(self.features(x).mean(dim=(2, 3)))


@register_model("mobilenet_v1", num_classes=1000, input_shape=(3, 224, 224))
def mobilenet_v1(*, num_classes, input_shape, width, stem="imagenet") -> nn.Module:
    return MobileNetV1(input_shape[0], num_classes, width, stem)


# ---------------------------------------------------------------- character-level GRU


class CharGRU(nn.Module):
    """Embedding -> GRU -> Linear readout; (B, T) int64 tokens -> (B, T, vocab) logits."""

    def __init__(self, vocab: int, embed_dim: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embedding(tokens))  # (B, T, hidden)
        return self.head(out)


@register_model("char_gru", num_classes=256, input_shape=(128,), dtype=torch.int64)
def char_gru(*, num_classes, input_shape, width, embed_dim=128, hidden_size=512, num_layers=1):
    """Character LM in the spirit of the paper's WikiText-103 GRU (CPU-sized defaults).

    ``num_classes`` is the vocabulary size; ``input_shape`` is ``(seq_len,)``.
    """
    del input_shape  # any sequence length works
    return CharGRU(num_classes, scaled(embed_dim, width), scaled(hidden_size, width), num_layers)


# ---------------------------------------------------------------- character-level GPT


@register_model("char_gpt", num_classes=256, input_shape=(128,), dtype=torch.int64)
def char_gpt(
    *, num_classes, input_shape, width, d_model=128, n_layer=2, n_head=4, mlp_ratio=4
) -> nn.Module:
    """Pre-LayerNorm GPT with tied embeddings (:mod:`rigl.experiments.models.char_gpt`).

    ``num_classes`` is the vocabulary size; ``input_shape`` is ``(seq_len,)``, the context.
    """
    from rigl.experiments.models.char_gpt import CharGPT

    d = scaled(d_model, width)
    return CharGPT(num_classes, input_shape[0], d, n_layer, n_head, mlp_ratio)
