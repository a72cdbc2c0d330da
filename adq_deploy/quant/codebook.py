"""ADQ weight quantizer: a learned per-layer scalar codebook, quantile init, EMA adaptation."""

from __future__ import annotations

import math

import torch
from torch import nn

FORMS = ("full", "symmetric")
INITS = ("quantile", "uniform", "kmeans")


def codebook_size(bits: int, form: str) -> int:
    """Number of levels: 2^b for the `full` form, 2^b - 1 (zero, equal sides) for `symmetric`."""
    if form == "full":
        return 2**bits
    if form == "symmetric":
        return 2**bits - 1
    raise ValueError(f"unknown codebook form {form!r}; expected one of {FORMS}")


def quantile_sorted(sorted_values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles of an ascending 1-D tensor, NumPy's default 'linear' rule, at any size.

    torch.quantile refuses inputs over 2^24 elements; interpolating on a sorted copy does not.
    """
    n = sorted_values.numel()
    pos = q.to(torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = pos.ceil().long().clamp(0, n - 1)
    frac = (pos - lo.to(torch.float64)).to(sorted_values.dtype)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def side_counts(n_nonzero_levels: int, n_neg: int, n_pos: int, form: str) -> tuple[int, int]:
    """How many non-zero levels go to the negative and the positive side.

    `symmetric` splits evenly. `full` has an odd number of non-zero levels (2^b - 1): they are
    shared in proportion to how many weights lie on each side, at least one a side when both
    sides hold weights.
    """
    if form == "symmetric":
        return n_nonzero_levels // 2, n_nonzero_levels // 2
    if n_neg == 0 and n_pos == 0:
        return n_nonzero_levels // 2, n_nonzero_levels - n_nonzero_levels // 2
    if n_neg == 0:
        return 0, n_nonzero_levels
    if n_pos == 0:
        return n_nonzero_levels, 0
    k_pos = math.floor(n_nonzero_levels * n_pos / (n_pos + n_neg) + 0.5)
    k_pos = min(max(k_pos, 1), n_nonzero_levels - 1)
    return n_nonzero_levels - k_pos, k_pos


def _side_levels(magnitudes_sorted: torch.Tensor, k: int, init: str) -> torch.Tensor:
    """k positive levels for one side, from that side's sorted weight magnitudes."""
    if k == 0:
        return magnitudes_sorted.new_zeros(0)
    if magnitudes_sorted.numel() == 0:
        return magnitudes_sorted.new_zeros(k)
    if init == "uniform":
        top = magnitudes_sorted[-1]
        return top * torch.arange(1, k + 1, dtype=magnitudes_sorted.dtype) / k
    q = (torch.arange(1, k + 1, dtype=torch.float64) - 0.5) / k
    return quantile_sorted(magnitudes_sorted, q)


def init_codebook(
    weight: torch.Tensor,
    bits: int,
    form: str = "full",
    init: str = "quantile",
    kmeans_iters: int = 20,
) -> torch.Tensor:
    """Initial sorted codebook: per-sign quantiles (or uniform, k-means levels) and zero."""
    if init not in INITS:
        raise ValueError(f"unknown codebook init {init!r}; expected one of {INITS}")
    w = weight.detach().reshape(-1).to(torch.float32).cpu()
    size = codebook_size(bits, form)
    neg = (-w[w < 0]).sort().values
    pos = w[w > 0].sort().values
    if form == "symmetric" and (neg.numel() == 0) != (pos.numel() == 0):
        # One-signed weights: mirror the populated side rather than stack duplicate zeros.
        neg = pos = neg if neg.numel() else pos
    k_neg, k_pos = side_counts(size - 1, neg.numel(), pos.numel(), form)
    base = "uniform" if init == "uniform" else "quantile"
    levels = torch.cat(
        [-_side_levels(neg, k_neg, base).flip(0), w.new_zeros(1), _side_levels(pos, k_pos, base)]
    )
    if init == "kmeans":
        levels = kmeans_refine(w, levels, kmeans_iters)
    return levels.sort().values


def assign(weight: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (thresholds at midpoints; a tie goes to the lower level)."""
    mid = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(weight, mid.to(weight.dtype))


def level_means(
    weight: torch.Tensor, idx: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level (count, mean) of the weights assigned to each level."""
    flat = weight.detach().reshape(-1).to(torch.float64)
    flat_idx = idx.reshape(-1)
    counts = torch.zeros(size, dtype=torch.float64, device=flat.device).index_add_(
        0, flat_idx, torch.ones_like(flat)
    )
    sums = torch.zeros(size, dtype=torch.float64, device=flat.device).index_add_(0, flat_idx, flat)
    return counts, sums / counts.clamp_min(1)


def kmeans_refine(w: torch.Tensor, levels: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations on 1-D weights with the zero level pinned at zero."""
    levels = levels.clone()
    zero = levels == 0
    for _ in range(iters):
        idx = assign(w, levels)
        counts, means = level_means(w, idx, levels.numel())
        new = torch.where(counts > 0, means.to(levels.dtype), levels)
        new[zero] = 0
        new = new.sort().values
        if torch.equal(new, levels):
            break
        levels = new
        zero = levels == 0
    return levels


class CodebookQuantizer(nn.Module):
    """Maps a weight tensor onto a learned sorted codebook, straight-through in the backward pass.

    In training mode with `ema=True`, every forward pass (one per training step) moves each level
    toward the mean of the weights assigned to it: C_k <- beta C_k + (1 - beta) mean_k. Empty
    levels and the zero level stay where they are; levels are kept sorted.
    """

    def __init__(
        self,
        bits: int,
        form: str = "full",
        init: str = "quantile",
        ema: bool = True,
        beta: float = 0.99,
        clip_grad: bool = False,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"weight bits must be in 2..8, got {bits}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        if init not in INITS:
            raise ValueError(f"unknown codebook init {init!r}; expected one of {INITS}")
        self.bits, self.form, self.init = bits, form, init
        self.ema, self.beta, self.clip_grad = ema, beta, clip_grad
        size = codebook_size(bits, form)
        self.register_buffer("codebook", torch.zeros(size))
        if weight is not None:
            self.reset(weight)

    @torch.no_grad()
    def reset(self, weight: torch.Tensor) -> None:
        """(Re)initialize the codebook from a weight tensor with the configured init rule."""
        self.codebook.copy_(init_codebook(weight, self.bits, self.form, self.init))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer code (level index) of every weight."""
        return assign(weight.detach(), self.codebook)

    @torch.no_grad()
    def ema_update(self, weight: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """One EMA step of the codebook toward the per-level means of `weight`."""
        cb = self.codebook
        if idx is None:
            idx = self.codes(weight)
        counts, means = level_means(weight, idx, cb.numel())
        moved = self.beta * cb.to(torch.float64) + (1 - self.beta) * means
        new = torch.where((counts > 0) & (cb != 0), moved, cb.to(torch.float64))
        cb.copy_(new.to(cb.dtype).sort().values)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        cb = self.codebook.to(weight.dtype)
        idx = assign(weight.detach(), cb)
        wq = cb[idx]
        if self.clip_grad:
            inside = (weight >= cb[0]) & (weight <= cb[-1])
            w_ste = torch.where(inside, weight, weight.detach())
        else:
            w_ste = weight
        out = wq + (w_ste - w_ste.detach())
        if self.training and self.ema and torch.is_grad_enabled():
            self.ema_update(weight, idx)
        return out

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, form={self.form}, init={self.init}, ema={self.ema}, "
            f"beta={self.beta}, clip_grad={self.clip_grad}"
        )
