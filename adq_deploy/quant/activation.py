"""Activation quantizers: N2UQ (learned non-uniform thresholds, uniform integer outputs), LSQ,
and InputQuant (the network input on 8-bit levels with a zero point)."""

from __future__ import annotations

import math

import torch
from torch import nn

ACT_KINDS = ("n2uq", "lsq")
MIN_WIDTH = 1e-3
MIN_SCALE = 1e-4
SMALL_LEVELS = 16  # up to 4-bit activations: comparison loops beat searchsorted on CPU


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
        # Run the backward pass through a torch.compile'd kernel (training speed; not saved).
        self.fused = False

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

    def levels_of(self, x: torch.Tensor) -> torch.Tensor:
        """Integer level q in 0..L-1 (uint8) of every input, as the deployed threshold op gives."""
        with torch.no_grad():
            return _n2uq_levels(self.scale_in() * x, self.thresholds())

    def surrogate(self, xs: torch.Tensor) -> torch.Tensor:
        """q~(x'): 0 below d_0, L-1 above d_{L-1}, (x' - d_{i-1}) / a_i + (i - 1) in between."""
        d = self.segment_ends()
        a = self.widths.clamp_min(MIN_WIDTH)
        flat = xs.detach().reshape(-1)
        seg = torch.searchsorted(d.detach(), flat, right=True).reshape(xs.shape) - 1
        inner = seg.clamp(0, self.levels - 2)
        ramp = (xs - d[inner]) / a[inner] + inner.to(xs.dtype)
        top = torch.full_like(xs, self.levels - 1)
        return torch.where(
            seg < 0, torch.zeros_like(xs), torch.where(seg >= self.levels - 1, top, ramp)
        )

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's formulation, step * (q + q~ - q~.detach()), differentiated by autograd.

        Slow (gathers on every element); forward() computes the same values and gradients in
        closed form.
        """
        xs = self.scale_in() * x
        q = _n2uq_levels(xs.detach(), self.thresholds().detach()).to(x.dtype)
        sur = self.surrogate(xs)
        return self.step() * (q + (sur - sur.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.widths.clamp_min(MIN_WIDTH)
        return _N2UQFunction.apply(x, self.start, a, self.scale_in(), self.alpha2, self.fused)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _n2uq_levels(xs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """q = #{i : x' >= T_i} as uint8 (comparison loop: faster than searchsorted for small L)."""
    if thresholds.numel() + 1 > SMALL_LEVELS:
        flat = xs.reshape(-1)
        return torch.searchsorted(thresholds, flat, right=True).reshape(xs.shape).to(torch.uint8)
    q = torch.zeros(xs.shape, dtype=torch.uint8, device=xs.device)
    for t in thresholds.unbind():
        q += xs >= t
    return q


def _count_float(xs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """#{i : x' >= T_i} as floats, written so that torch.compile fuses it into its caller's loop."""
    q = (xs >= thresholds[0]).to(xs.dtype)
    for j in range(1, thresholds.numel()):
        q = q + (xs >= thresholds[j]).to(xs.dtype)
    return q


def _n2uq_values(x: torch.Tensor, alpha1: torch.Tensor, thresholds: torch.Tensor, k: torch.Tensor):
    """y = k * #{i : alpha1 x >= T_i} in one expression: what torch.compile fuses into one loop."""
    return k * _count_float(alpha1 * x, thresholds)


def _segment_sums_loop(xs: torch.Tensor, g: torch.Tensor, d: torch.Tensor, inv: torch.Tensor):
    """g / a_seg per element and the sums of g / a and g x' / a over x' >= d_j, j < L - 1.

    One pass per mask: what torch.compile fuses into a single loop.
    """
    steps = torch.cat([inv[:1], inv[1:] - inv[:-1], -inv[-1:]])
    inv_seg = torch.zeros_like(xs)
    for j in range(d.numel()):
        inv_seg = inv_seg + (xs >= d[j]).to(xs.dtype) * steps[j]
    ga = g * inv_seg
    gax = ga * xs
    cum_g = torch.stack([torch.where(xs >= d[j], ga, 0).sum() for j in range(d.numel() - 1)])
    cum_gx = torch.stack([torch.where(xs >= d[j], gax, 0).sum() for j in range(d.numel() - 1)])
    return ga, cum_g, cum_gx, gax.sum()


def _fused_backward_sums(
    xs: torch.Tensor, g: torch.Tensor, d: torch.Tensor, inv: torch.Tensor, thresholds: torch.Tensor
):
    """_segment_sums_loop plus sum(g q), q recomputed from x' (nothing saved but x)."""
    ga, cum_g, cum_gx, gax_sum = _segment_sums_loop(xs, g, d, inv)
    return ga, cum_g, cum_gx, gax_sum, (g * _count_float(xs, thresholds)).sum()


def _segment_sums_gemv(xs: torch.Tensor, g: torch.Tensor, d: torch.Tensor, inv: torch.Tensor):
    """The same sums as _segment_sums_loop from a [L, N] mask matrix and GEMVs (eager-fast)."""
    masks = xs.new_empty(d.numel(), xs.numel())
    torch.ge(xs.reshape(1, -1), d.reshape(-1, 1), out=masks)  # straight to float: no bool copy
    steps = torch.cat([inv[:1], inv[1:] - inv[:-1], -inv[-1:]])
    ga = g * (steps @ masks).reshape(xs.shape)
    gax = ga * xs
    return ga, masks[:-1] @ ga.reshape(-1), masks[:-1] @ gax.reshape(-1), gax.sum()


def _segment_sums_search(xs: torch.Tensor, g: torch.Tensor, d: torch.Tensor, inv: torch.Tensor):
    """The same sums for many levels (5-8 bit activations): searchsorted and bincount."""
    levels = d.numel()
    seg = torch.searchsorted(d, xs.reshape(-1), right=True)
    ga = g * torch.cat([inv.new_zeros(1), inv, inv.new_zeros(1)])[seg].reshape(xs.shape)
    gax = ga * xs
    seg_g = torch.bincount(seg, weights=ga.reshape(-1), minlength=levels + 1)[1:levels]
    seg_gx = torch.bincount(seg, weights=gax.reshape(-1), minlength=levels + 1)[1:levels]
    cum = lambda v: v.flip(0).cumsum(0).flip(0).to(xs.dtype)  # noqa: E731
    return ga, cum(seg_g), cum(seg_gx), gax.sum()


_COMPILED: dict[str, object] = {}


def _compiled(name: str, fn):
    """torch.compile(fn) once per process (dynamic shapes), for N2UQ.fused = True."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


class _N2UQFunction(torch.autograd.Function):
    """N2UQ forward and its G-STE backward in closed form (no per-element scatter).

    On segment i (d_{i-1} <= x' < d_i), with k = alpha2 * 2 / (L - 1):
    dy/dx = k alpha1 / a_i, dy/dalpha1 = k x / a_i, dy/ds = -k / a_i,
    dy/da_j = -k / a_i for j < i, dy/da_i = -k (x' - d_{i-1}) / a_i^2; zero outside [d_0, d_{L-1});
    dy/dalpha2 = 2 q / (L - 1) everywhere.
    """

    @staticmethod
    def forward(ctx, x, start, widths, alpha1, alpha2, fused):  # type: ignore[override]
        levels = widths.numel() + 1
        d = torch.cat([start.reshape(1), start + torch.cumsum(widths, 0)])
        thresholds = d[:-1] + widths / 2
        k = alpha2 * (2.0 / (levels - 1))
        ctx.fused = fused and levels <= SMALL_LEVELS
        if ctx.fused:
            ctx.save_for_backward(x, thresholds, d, widths, alpha1, alpha2)
            return _compiled("values", _n2uq_values)(x, alpha1, thresholds, k)
        q = _n2uq_levels(alpha1 * x, thresholds)
        ctx.save_for_backward(x, q, d, widths, alpha1, alpha2)
        return q * k  # uint8 levels times a float scalar: one pass, float result

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, q, d, widths, alpha1, alpha2 = ctx.saved_tensors  # q: the thresholds when fused
        levels = widths.numel() + 1
        c = 2.0 / (levels - 1)
        k = alpha2 * c
        inv = 1.0 / widths
        if ctx.fused:  # q is not saved: the kernel recomputes it with the thresholds
            fused = _compiled("backward", _fused_backward_sums)
            ga, cum_g, cum_gx, gax_sum, gq_sum = fused(alpha1 * x, g, d, inv, q)
        else:
            sums = _segment_sums_search if levels > SMALL_LEVELS else _segment_sums_gemv
            ga, cum_g, cum_gx, gax_sum = sums(alpha1 * x, g, d, inv)
            gq_sum = (g * q).sum()
        # per segment i: G_i = sum g/a_i, H_i = sum g (x' - d_{i-1}) / a_i^2
        zero = cum_g.new_zeros(1)
        seg_g = cum_g - torch.cat([cum_g[1:], zero])
        seg_gx = cum_gx - torch.cat([cum_gx[1:], zero])
        h = (seg_gx - d[:-1] * seg_g) * inv
        later = cum_g - seg_g  # sum over the segments after j
        grad_x = (k * alpha1) * ga
        grad_widths = -k * (later + h)
        grad_alpha2 = c * gq_sum
        return grad_x, -k * cum_g[0], grad_widths, k * gax_sum / alpha1, grad_alpha2, None


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
    """Uniform unsigned quantizer, learned step (LSQ, Esser et al. 2020): the ablation baseline.

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
        return torch.clamp(
            torch.round(x.detach() / self.step().detach()), 0, self.levels - 1
        ).long()

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


class InputQuant(nn.Module):
    """Uniform quantizer of a float network input onto levels 0..2^n-1 with a zero point.

    q = #{i in 1..2^n-1 : x / s >= i - z - 1/2} (x / s the float32 product x * (1/s)) and value
    y = (q - z) * s, so zero is level z exactly and zero padding stays zero. The step s and the
    integer zero point z are set from the range of the first training batch (zero included) and
    then kept; the gradient passes straight through inside the range.
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"input bits must be in 2..8, got {bits}")
        self.bits = bits
        self.register_buffer("step_size", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def levels(self) -> int:
        return 2**self.bits

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Step and zero point from the range of x, widened to contain 0."""
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        step = max((hi - lo) / (self.levels - 1), MIN_SCALE)
        self.step_size.fill_(step)
        self.zero_point.fill_(int(min(max(round(-lo / step), 0), self.levels - 1)))
        self.initialized.fill_(True)

    def step(self) -> torch.Tensor:
        """Output value of one level, s."""
        return self.step_size

    def scale_in(self) -> torch.Tensor:
        """1 / s in float32: the factor the thresholds are compared against."""
        return torch.reciprocal(self.step_size.float())

    def thresholds(self) -> torch.Tensor:
        """i - z - 1/2 for i = 1..2^n-1 (exact in float32)."""
        i = torch.arange(1, self.levels, dtype=torch.float32, device=self.step_size.device)
        return i - self.zero_point.float() - 0.5

    def levels_of(self, x: torch.Tensor) -> torch.Tensor:
        """Integer level q of every input (uint8), as the deployed threshold op gives."""
        with torch.no_grad():
            return self._count(x).to(torch.uint8)

    def _count(self, x: torch.Tensor) -> torch.Tensor:
        """#{i : x / s >= i - z - 1/2} as floats, in elementwise ops (traceable, no search)."""
        t0 = 0.5 - self.zero_point.float()
        return uniform_count(self.scale_in() * x.float(), t0, self.levels - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.calibrate(x)
        q = self._count(x.detach())
        y = ((q - self.zero_point.float()) * self.step_size).to(x.dtype)
        lo = -self.zero_point * self.step_size
        hi = (self.levels - 1 - self.zero_point) * self.step_size
        xc = torch.minimum(torch.maximum(x, lo), hi)
        return y + (xc - xc.detach())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def uniform_count(xs: torch.Tensor, t0: torch.Tensor, count: int) -> torch.Tensor:
    """#{i < count : xs >= t0 + i} (floats) for thresholds t0 + i exact in float32.

    c = clip(floor(xs - t0) + 1, 0, count) is at most one off (the subtraction rounds once,
    and far outside the range the clip decides alone); one step down where xs < t0 + c - 1 and
    one up where xs >= t0 + c make it exact. NaN counts 0. The standard writer emits the same.
    """
    c = torch.clamp(torch.floor(xs - t0) + 1, 0, count)
    c = c - ((c >= 1) & (xs < t0 + c - 1)).to(xs.dtype)
    c = c + ((c < count) & (xs >= t0 + c)).to(xs.dtype)
    return torch.where(torch.isnan(xs), torch.zeros_like(c), c)


def make_act_quantizer(kind: str, bits: int) -> nn.Module:
    """Build the activation quantizer named by `kind` ('n2uq' or 'lsq')."""
    if kind == "n2uq":
        return N2UQ(bits)
    if kind == "lsq":
        return LSQ(bits)
    raise ValueError(f"unknown activation quantizer {kind!r}; expected one of {ACT_KINDS}")
