"""CIFAR-style ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2).

A 3x3 stem conv, three stages of BasicBlocks (``width``, ``2*width``, ``4*width`` channels,
stride 2 at the start of stages 2 and 3), global average pooling and a Linear classifier. Works
on any input size, e.g. 28x28 (Fashion-MNIST, ``in_channels=1``) and 32x32 (CIFAR-10).

Layers are registered in forward order: the stem conv is the first registered Conv2d/Linear and
the classifier the last, which is what quantization's first/last-layer rules rely on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_resnet_style
from .registry import register

__all__ = ["CifarBasicBlock", "CifarResNet", "ShortcutA", "resnet20"]


class ShortcutA(nn.Module):
    """Parameter-free shortcut ("option A"): stride-2 subsampling plus zero-padded channels.

    As in the original CIFAR ResNet, the ``out - in`` extra channels are zeros split between the
    front and the back of the channel axis. Uses only slicing and a constant pad (ONNX Slice/Pad).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"shortcut A cannot reduce channels ({in_channels} -> {out_channels}); use 'B'"
            )
        if stride not in (1, 2):
            raise ValueError(f"shortcut A supports stride 1 or 2, got {stride}")
        self.stride = stride
        extra = out_channels - in_channels
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = x[:, :, ::2, ::2]
        if self.pad_front or self.pad_back:
            x = F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6 * blocks_per_stage + 2``; ``blocks_per_stage=3`` is ResNet-20."""

    def __init__(
        self,
        blocks_per_stage: int = 3,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        shortcut = str(shortcut).upper()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if blocks_per_stage < 1 or num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError("blocks_per_stage, num_classes, in_channels and width must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages = []
        channels = width
        for i, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(CifarBasicBlock(channels, out_channels, stride, shortcut))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels, num_classes)
        init_resnet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register("resnet20")
def resnet20(
    num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: str = "A"
) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (32x32) or Fashion-MNIST (28x28, ``in_channels=1``).

    Parameters (weights + biases + BN affine), shortcut "A", defaults: 269,722
    (stem 432 + BN 32; stage 1: 3 x (2 x 2,304 + 2 x 32) = 14,016; stage 2: 13,952 + 2 x 18,560
    = 51,072; stage 3: 55,552 + 2 x 73,984 = 203,520; fc 64 x 10 + 10 = 650). With
    ``in_channels=1``: 269,434. Shortcut "B" adds two 1x1 projections with BN:
    (512 + 64) + (2,048 + 128) = 2,752, so 272,474.
    """
    return CifarResNet(3, num_classes, in_channels, width, shortcut)
