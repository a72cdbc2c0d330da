"""ImageNet-style ResNet-18 (He et al. 2016), layer for layer the torchvision architecture.

7x7 stride-2 stem conv, BN, ReLU, 3x3 stride-2 max pool, four stages of two BasicBlocks
(64, 128, 256, 512 channels; stride 2 and a 1x1 conv + BN projection shortcut at the start of
stages 2-4), global average pooling and a Linear classifier. The stem conv is the first
registered Conv2d/Linear and the classifier the last (quantization's first/last-layer rules).
"""

from __future__ import annotations

import torch
from torch import nn

from .init import init_resnet_style
from .registry import register

__all__ = ["BasicBlock", "ResNet18", "resnet18"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet18(nn.Module):
    """ResNet-18; module names match torchvision's, so its state_dicts load directly."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = 64
        stages = []
        for i, out_channels in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(512, num_classes)
        init_resnet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet18:
    """ResNet-18 for ImageNet-size inputs (224x224; any size >= 32x32 runs).

    Parameters with the defaults: 11,689,512 (torchvision's count): stem 9,408 + BN 128;
    stage 1: 2 x (2 x 36,864 + 2 x 128) = 147,968; stage 2: 525,568; stage 3: 2,099,712;
    stage 4: 8,393,728; fc 512 x 1,000 + 1,000 = 513,000.
    """
    return ResNet18(num_classes, in_channels)
