"""Model zoo and registry: build networks by name, rebuild them from a checkpoint's spec."""

from .cnn import SmallCNN, small_cnn
from .registry import (
    ArchitectureError,
    UnknownModelError,
    architecture_of,
    available,
    build,
    get,
    register,
    unregister,
)
from .resnet_cifar import CifarBasicBlock, CifarResNet, ShortcutA, resnet20
from .resnet_imagenet import BasicBlock, ResNet18, resnet18

__all__ = [
    "ArchitectureError",
    "BasicBlock",
    "CifarBasicBlock",
    "CifarResNet",
    "ResNet18",
    "ShortcutA",
    "SmallCNN",
    "UnknownModelError",
    "architecture_of",
    "available",
    "build",
    "get",
    "register",
    "resnet18",
    "resnet20",
    "small_cnn",
    "unregister",
]
