"""Activation quantizers: N2UQ (learned non-uniform thresholds, uniform integer outputs) and LSQ."""

from __future__ import annotations

import math

import torch
from torch import nn

ACT_KINDS = ("n2uq", "lsq")
MIN_WIDTH = 1e-3
MIN_SCALE = 1e-4


class N2UQ(nn.Module):
    """Non-uniform-to-uniform quantizer (Liu et al., CVPR 2022) with learnable thresholds.

    x' = alpha1 * x; segment ends d_0 = s, d_i = s + a_1 + ... + a_i; thresholds
    T_i = d_{i-1} + a_i / 2. Output y = step * q with q = #{i : x' >= T_i} in 0..L-1 and
    step = alpha2 * 2 / (L - 1). The backward pass is the generalized straight-through estimator:
    the gradient of the piecewise-linear q~ that rises from i-1 to i across [d_{i-1}, d_i).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"activation bits must be in 1..8, got {bits}")
        self.bits = bits
        levels = 2**bits
        self.start = nn.Parameter(torch.zeros(()))
        self.widths = nn.Parameter(torch.full((levels - 1,), 2.0 / (levels - 1)))
        self.alpha1 = nn.Parameter(torch.ones(()))
        self.alpha2 = nn.Parameter(torch.ones(()))

    @property
    def levels(self) -> int:
        return 2**self.bits

    def segment_ends(self) -> torch.Tensor:
        """d_0..d_{L-1} in the scaled domain (widths clamped to >= 1e-3)."""
        a = self.widths.clamp_min(MIN_WIDTH)
        return torch.cat([self.start.reshape(1), self.start + torch.cumsum(a, 0)])

    def thresholds(self) -> torch.Tensor:
        """T_1..T_{L-1} in the scaled domain x' = alpha1 * x."""
        d = self.segment_ends()
        return d[:-1] + self.widths.clamp_min(MIN_WIDTH) / 2

    def scale_in(self) -> torch.Tensor:
        """alpha1, kept positive so thresholds map back to the input domain."""
        return self.alpha1.clamp_min(MIN_SCALE)

    def step(self) -> torch.Tensor:
        """Output value of one integer level: alpha2 * 2 / (L - 1)."""
        return self.alpha2 * (2.0 / (self.levels - 1))

    def _count_thresholds(self, xs: torch.Tensor) -> torch.Tensor:
        """#{i : x' >= T_i} for scaled inputs x' (no gradient)."""
        flat = xs.detach().reshape(-1)
        return torch.searchsorted(self.thresholds().detach(), flat, right=True).reshape(xs.shape)

    def levels_of(self, x: torch.Tensor) -> torch.Tensor:
        """Integer level q in 0..L-1 of every input (what the deployed threshold op computes)."""
        return self._count_thresholds(self.scale_in() * x)

    def surrogate(self, xs: torch.Tensor) -> torch.Tensor:
        """q~(x'): 0 below d_0, L-1 above d_{L-1}, (x' - d_{i-1}) / a_i + (i - 1) in between."""
        d = self.segment_ends()
        a = self.widths.clamp_min(MIN_WIDTH)
        flat = xs.detach().reshape(-1)
        seg = torch.searchsorted(d.detach(), flat, right=True).reshape(xs.shape) - 1
        inner = seg.clamp(0, self.levels - 2)
        ramp = (xs - d[inner]) / a[inner] + inner.to(xs.dtype)
        top = torch.full_like(xs, self.levels - 1)
        return torch.where(seg < 0, torch.zeros_like(xs), torch.where(seg >= self.levels - 1, top, ramp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.scale_in() * x
        q = self._count_thresholds(xs).to(x.dtype)
        sur = self.surrogate(xs)
        return self.step() * (q + sur - sur.detach())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient times a constant (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


class LSQ(nn.Module):
    """Uniform unsigned quantizer with a learned step (Esser et al., ICLR 2020): the ablation baseline.

    y = s * clamp(round(x / s), 0, 2^n - 1); the step is initialized from the first batch seen as
    2 mean|x| / sqrt(Q_p) and learned with LSQ's gradient scale 1 / sqrt(numel * Q_p).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"activation bits must be in 1..8, got {bits}")
        self.bits = bits
        self.step_size = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def levels(self) -> int:
        return 2**self.bits

    def step(self) -> torch.Tensor:
        """Output value of one integer level."""
        return self.step_size.clamp_min(MIN_SCALE)

    def levels_of(self, x: torch.Tensor) -> torch.Tensor:
        """Integer level q in 0..2^n-1 of every input."""
        return torch.clamp(torch.round(x.detach() / self.step().detach()), 0, self.levels - 1).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.levels - 1
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.step_size.fill_(max(2 * x.abs().mean().item() / math.sqrt(qp), MIN_SCALE))
                self.initialized.fill_(True)
        s = _GradScale.apply(self.step(), 1.0 / math.sqrt(x.numel() * qp))
        v = torch.clamp(x / s, 0, qp)
        return (v + (torch.round(v) - v).detach()) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def make_act_quantizer(kind: str, bits: int) -> nn.Module:
    """Build the activation quantizer named by `kind` ('n2uq' or 'lsq')."""
    if kind == "n2uq":
        return N2UQ(bits)
    if kind == "lsq":
        return LSQ(bits)
    raise ValueError(f"unknown activation quantizer {kind!r}; expected one of {ACT_KINDS}")
