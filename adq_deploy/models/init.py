"""Weight initialization shared by the model zoo."""

from __future__ import annotations

from torch import nn


def init_resnet_style(model: nn.Module) -> None:
    """He (fan-out) init for convs, unit-scale zero-shift batch norms, as in the ResNet papers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
