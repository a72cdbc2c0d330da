"""A small, accurate plain CNN for 28x28 inputs (MNIST / Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch import nn

from .init import init_resnet_style
from .registry import register

__all__ = ["SmallCNN", "small_cnn"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """Five conv3x3-BN-ReLU blocks, global average pooling, Linear.

    Channels w, w, 2w (stride 2), 2w, 4w (stride 2): 28x28 -> 28 -> 28 -> 14 -> 14 -> 7.
    The first conv is the first registered Conv2d/Linear and the classifier the last.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError("num_classes, in_channels and width must be >= 1")
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, w, 1),
            _conv_bn_relu(w, w, 1),
            _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 2 * w, 1),
            _conv_bn_relu(2 * w, 4 * w, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(4 * w, num_classes)
        init_resnet_style(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.features(x))))


@register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    """Small CNN for 28x28 grayscale images.

    Parameters with the defaults: 140,458 (convs without bias + BN affine:
    288 + 64, 9,216 + 64, 18,432 + 128, 36,864 + 128, 73,728 + 256; fc 128 x 10 + 10 = 1,290).
    """
    return SmallCNN(num_classes, in_channels, width)
