"""Hessian-trace layer sensitivity and exact mixed-precision bit allocation (HAWQ-V2 style)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .quant.apply import plan_layers
from .quant.codebook import assign, init_codebook
from .quant.config import QuantConfig

DEFAULT_CANDIDATES: tuple[int, ...] = (2, 3, 4)


@dataclass
class LayerSensitivity:
    """Sensitivity of one layer: weight count, Hessian trace and Omega score per candidate bits."""

    name: str
    params: int
    trace: float
    omega: dict[int, float]


class _Scored(Protocol):
    params: int
    omega: Mapping[int, float]


def _rademacher(shape: torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    z = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return (z * 2 - 1).to(device=like.device, dtype=like.dtype)


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v


def hessian_traces(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[Any],
    params: dict[str, torch.Tensor],
    probes: int = 8,
    seed: int = 0,
    blockwise: bool = True,
) -> dict[str, float]:
    """Hutchinson estimate of Tr(H) of the loss w.r.t. each named weight, averaged over batches.

    blockwise=True does one Hessian-vector product per weight and probe, z_l^T H_ll z_l: never
    negative where the block is PSD. blockwise=False does one joint product per probe and reads
    z_l^T (H z)_l, unbiased too but noisier by the cross-layer terms z_l^T H_lk z_k.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    if not params:
        return {}
    names = list(params)
    weights = [params[n] for n in names]
    device = weights[0].device
    gen = torch.Generator().manual_seed(seed)
    # Accumulated on the device: one host sync at the end, not one per probe.
    sums = [torch.zeros((), dtype=torch.float64, device=w.device) for w in weights]
    n_batches = 0
    was_training = model.training
    had_grad = [w.requires_grad for w in weights]
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                x, y = batch
                loss = loss_fn(model(_to(x, device)), _to(y, device))
                grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
                # A gradient with no graph (loss linear or constant in that weight) has H = 0.
                live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                for _ in range(probes):
                    zs = [_rademacher(w.shape, gen, w) for w in weights]
                    if blockwise:
                        for i in live:
                            (hz,) = torch.autograd.grad(
                                grads[i], weights[i], zs[i], retain_graph=True, allow_unused=True
                            )
                            if hz is not None:
                                sums[i] += (zs[i] * hz).sum().double()
                        continue
                    if not live:
                        continue
                    hzs = torch.autograd.grad(
                        [grads[i] for i in live],
                        weights,
                        grad_outputs=[zs[i] for i in live],
                        retain_graph=True,
                        allow_unused=True,
                    )
                    for i, (z, hz) in enumerate(zip(zs, hzs, strict=True)):
                        if hz is not None:
                            sums[i] += (z * hz).sum().double()
                n_batches += 1
    finally:
        for w, flag in zip(weights, had_grad, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("batches is empty: need at least one (x, y) batch")
    return {n: s.item() / (probes * n_batches) for n, s in zip(names, sums, strict=True)}


def quant_error(
    weight: torch.Tensor, bits: int, form: str = "full", init: str = "quantile"
) -> float:
    """Squared error ||Q_b(W) - W||^2 of the nearest-level codebook quantization at init."""
    w = weight.detach().to(torch.float32).cpu()
    cb = init_codebook(w, bits, form, init)
    wq = cb[assign(w, cb)]
    return float((wq.to(torch.float64) - w.to(torch.float64)).pow(2).sum().item())


def layer_sensitivity(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[Any],
    config: QuantConfig | None = None,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    probes: int = 8,
    seed: int = 0,
    blockwise: bool = True,
) -> dict[str, LayerSensitivity]:
    """Omega_l(b) = (Tr(H_l) / n_l) * ||Q_b(W_l) - W_l||^2 for the body layers of a float model.

    A negative trace estimate (non-convex point or probe noise) is kept in `trace` but clamped
    to zero in `omega`: quantization noise cannot be modelled as lowering the loss.
    """
    config = config or QuantConfig()
    cands = _check_candidates(candidates)
    if cands[0] < 2 or cands[-1] > 8:
        raise ValueError(f"candidate weight bits must be in 2..8, got {cands}")
    body = [p for p in plan_layers(model, config) if p.role == "body"]
    weights = {p.name: model.get_submodule(p.name).weight for p in body}
    traces = hessian_traces(model, loss_fn, batches, weights, probes, seed, blockwise)
    negative = [n for n, t in traces.items() if t < 0]
    if negative:
        warnings.warn(
            f"negative Hessian trace estimate for {', '.join(negative)}; Omega set to 0 there",
            stacklevel=2,
        )
    out = {}
    for p in body:
        w = weights[p.name]
        scale = max(traces[p.name], 0.0) / p.params
        omega = {b: scale * quant_error(w, b, config.w_form, config.w_init) for b in cands}
        out[p.name] = LayerSensitivity(p.name, p.params, traces[p.name], omega)
    return out


def _check_candidates(candidates: Sequence[int]) -> list[int]:
    cands = sorted({int(b) for b in candidates})
    if not cands:
        raise ValueError("candidates is empty: need at least one candidate bit width")
    if cands[0] < 1:
        raise ValueError(f"candidate bits must be positive integers, got {cands}")
    return cands


def _prepare(
    sensitivities: Mapping[str, _Scored], budget: float, candidates: Sequence[int]
) -> tuple[list[str], np.ndarray, list[int], np.ndarray, int]:
    """Validated (names, params, sorted candidates, omega matrix L x K, integer capacity)."""
    cands = _check_candidates(candidates)
    if not math.isfinite(budget) or budget < cands[0]:
        raise ValueError(
            f"infeasible budget {budget} bits: the smallest candidate is {cands[0]} bits"
        )
    names = list(sensitivities)
    n = np.array([int(sensitivities[k].params) for k in names], dtype=np.int64)
    if (n <= 0).any():
        bad = [k for k, v in zip(names, n, strict=True) if v <= 0]
        raise ValueError(f"layers with no parameters: {', '.join(bad)}")
    omega = np.empty((len(names), len(cands)), dtype=np.float64)
    for i, k in enumerate(names):
        scores = sensitivities[k].omega
        missing = [b for b in cands if b not in scores]
        if missing:
            raise ValueError(f"layer {k!r} has no score for candidate bits {missing}")
        omega[i] = [float(scores[b]) for b in cands]
    if not np.isfinite(omega).all():
        raise ValueError("sensitivity scores must be finite")
    capacity = math.floor(budget * int(n.sum()) + 1e-9)
    if int(n.sum()) * cands[0] > capacity:
        raise ValueError(f"infeasible budget {budget} bits: below the all-{cands[0]}-bit size")
    return names, n, cands, omega, capacity


def allocate_bits(
    sensitivities: Mapping[str, _Scored],
    budget: float,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    max_states: int = 2_000_000,
) -> dict[str, int]:
    """Exact min sum Omega_l(b_l) s.t. sum n_l b_l <= budget * sum n_l (multiple-choice knapsack).

    Dynamic programming over the Pareto frontier of (total bits, total score) partial
    assignments, in integer bits. Falls back to `allocate_bits_greedy` (with a warning) if the
    frontier grows past `max_states`.
    """
    names, n, cands, omega, capacity = _prepare(sensitivities, budget, candidates)
    if not names:
        return {}
    c = np.array(cands, dtype=np.int64)
    # Bits still needed by the remaining layers at their cheapest: prunes dead-end states.
    tail_min = np.concatenate([np.cumsum((n * c[0])[::-1])[::-1][1:], [0]])
    w_states = np.zeros(1, dtype=np.int64)
    c_states = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    k = len(cands)
    for i in range(len(names)):
        w_new = (w_states[:, None] + n[i] * c[None, :]).ravel()
        c_new = (c_states[:, None] + omega[i][None, :]).ravel()
        parent = np.repeat(np.arange(w_states.size), k)
        choice = np.tile(np.arange(k), w_states.size)
        ok = w_new <= capacity - tail_min[i]
        w_new, c_new, parent, choice = w_new[ok], c_new[ok], parent[ok], choice[ok]
        order = np.lexsort((c_new, w_new))
        w_new, c_new = w_new[order], c_new[order]
        parent, choice = parent[order], choice[order]
        # Keep a state only if it is strictly cheaper than every lighter (or equal-weight) one.
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(c_new)[:-1]])
        keep = c_new < best_before
        w_states, c_states = w_new[keep], c_new[keep]
        back.append((parent[keep], choice[keep]))
        if w_states.size > max_states:
            warnings.warn(
                f"bit allocation frontier exceeded max_states={max_states} at layer {i + 1}/"
                f"{len(names)}; falling back to the greedy (not optimal) allocation",
                stacklevel=2,
            )
            return allocate_bits_greedy(sensitivities, budget, candidates)
    # Scores strictly decrease along the frontier: the heaviest state is the optimum.
    idx = w_states.size - 1
    picks = [0] * len(names)
    for i in range(len(names) - 1, -1, -1):
        parent, choice = back[i]
        picks[i] = int(choice[idx])
        idx = int(parent[idx])
    return {name: cands[j] for name, j in zip(names, picks, strict=True)}


def allocate_bits_greedy(
    sensitivities: Mapping[str, _Scored],
    budget: float,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
) -> dict[str, int]:
    """Greedy fallback, not optimal: from all-max bits, lower the cheapest-per-bit-saved layer.

    Each step moves one layer to its next lower candidate, choosing the smallest score increase
    per weight bit saved, until the integer budget holds.
    """
    names, n, cands, omega, capacity = _prepare(sensitivities, budget, candidates)
    level = [len(cands) - 1] * len(names)
    total = int(sum(int(v) * cands[-1] for v in n))
    while total > capacity:
        best, best_ratio = -1, math.inf
        for i, j in enumerate(level):
            if j == 0:
                continue
            saved = int(n[i]) * (cands[j] - cands[j - 1])
            ratio = (omega[i, j - 1] - omega[i, j]) / saved
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        # _prepare guarantees the all-min assignment fits, so some layer can always step down.
        j = level[best]
        total -= int(n[best]) * (cands[j] - cands[j - 1])
        level[best] = j - 1
    return {name: cands[j] for name, j in zip(names, level, strict=True)}


def bits_report(
    assignment: Mapping[str, int], sensitivities: Mapping[str, _Scored]
) -> tuple[float, float]:
    """(parameter-weighted, per-layer mean) average bits of an assignment; NaNs if empty."""
    if not assignment:
        return float("nan"), float("nan")
    params = {k: int(sensitivities[k].params) for k in assignment}
    total = sum(params.values())
    weighted = sum(params[k] * b for k, b in assignment.items()) / total
    mean = sum(assignment.values()) / len(assignment)
    return weighted, mean
