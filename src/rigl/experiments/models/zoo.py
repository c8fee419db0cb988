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

The small nets are defined here; the CIFAR / ImageNet conv nets in
:mod:`rigl.experiments.models.convnets`, the GPT in :mod:`rigl.experiments.models.char_gpt`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rigl.config import ConfigError
from rigl.experiments.models.convnets import (
    BasicBlock,
    Bottleneck,
    MobileNetV1,
    ResNet,
    WideResNet,
    scaled,
)

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


# ---------------------------------------------------------------- conv nets (convnets.py)


@register_model("wrn", input_shape=(3, 32, 32))
def wrn(*, num_classes, input_shape, width, depth=22, widen=2) -> nn.Module:
    """WRN-depth-widen (Zagoruyko & Komodakis 2016); WRN-22-2 is the paper's CIFAR-10 net."""
    widths = [scaled(c, width) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
    return WideResNet(depth, widths, input_shape[0], num_classes)


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
