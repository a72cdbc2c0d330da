"""ADQ layers: Conv2d / Linear with a quantized input and codebook weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import CodebookQuantizer


class QuantLayerMixin:
    """Shared state of an ADQ layer: bits, role and the two quantizers."""

    weight: nn.Parameter
    weight_quant: CodebookQuantizer
    act_quant: nn.Module | None
    role: str

    def _attach(
        self, weight_quant: CodebookQuantizer, act_quant: nn.Module | None, role: str
    ) -> None:
        self.weight_quant = weight_quant
        self.act_quant = act_quant
        self.role = role

    @property
    def w_bits(self) -> int:
        return self.weight_quant.bits

    @property
    def a_bits(self) -> int | None:
        return None if self.act_quant is None else self.act_quant.bits

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it: codebook levels, straight-through gradient."""
        return self.weight_quant(self.weight)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the forward pass uses it (unchanged when activations stay in float)."""
        return x if self.act_quant is None else self.act_quant(x)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with ADQ weights and quantized inputs; any stride, padding, dilation, groups."""

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_quant: CodebookQuantizer,
        act_quant: nn.Module | None,
        role: str,
    ) -> QuantConv2d:
        """Wrap an existing conv, sharing its parameters."""
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"only zero padding is supported, got padding_mode={conv.padding_mode!r}"
            )
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new._attach(weight_quant, act_quant, role)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.quantize_input(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class QuantLinear(QuantLayerMixin, nn.Linear):
    """nn.Linear with ADQ weights and quantized inputs."""

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quant: CodebookQuantizer,
        act_quant: nn.Module | None,
        role: str,
    ) -> QuantLinear:
        """Wrap an existing linear layer, sharing its parameters."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new._attach(weight_quant, act_quant, role)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)
