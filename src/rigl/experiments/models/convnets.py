"""The convolutional networks of the RigL paper's CIFAR-10 and ImageNet experiments, as
plain ``nn.Module`` classes (torch only); :mod:`rigl.experiments.models.zoo` registers
them by name with their usual settings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    """A hidden width scaled by ``width``, rounded to the nearest integer, at least 1."""
    return max(1, round(channels * width))


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
