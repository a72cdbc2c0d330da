"""Bit allocation: exact knapsack vs brute force, greedy fallback, Hutchinson traces, Omega."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adq_deploy.allocation import (
    LayerSensitivity,
    allocate_bits,
    allocate_bits_greedy,
    bits_report,
    hessian_traces,
    layer_sensitivity,
    quant_error,
)
from adq_deploy.quant import QuantConfig


def _instance(rng: np.random.Generator, layers: int, cands: tuple[int, ...]):
    sens = {}
    for i in range(layers):
        n = int(rng.integers(10, 5001))
        # Strictly decreasing in bits, spread over several orders of magnitude.
        steps = np.sort(rng.uniform(0.0, 1.0, len(cands)))[::-1] * 10 ** rng.uniform(-3, 2)
        omega = {b: float(v) for b, v in zip(cands, np.cumsum(steps[::-1])[::-1], strict=True)}
        sens[f"l{i}"] = LayerSensitivity(f"l{i}", n, 1.0, omega)
    return sens


def _cost(sens, assignment) -> float:
    return sum(sens[k].omega[b] for k, b in assignment.items())


def _bits(sens, assignment) -> int:
    return sum(sens[k].params * b for k, b in assignment.items())


def _brute_force(sens, budget: float, cands) -> float:
    names = list(sens)
    total = sum(s.params for s in sens.values())
    best = math.inf
    for combo in itertools.product(cands, repeat=len(names)):
        a = dict(zip(names, combo, strict=True))
        # Independent feasibility test: exact rationals, no shared capacity arithmetic.
        if _bits(sens, a) <= budget * total * (1 + 1e-12):
            best = min(best, _cost(sens, a))
    return best


def _budgets(rng, sens, cands):
    total = sum(s.params for s in sens.values())
    lo, hi = min(cands), max(cands)
    exact = {k: int(rng.choice(cands)) for k in sens}
    return [
        float(lo),
        float(hi),
        float(rng.uniform(lo, hi)),
        float(rng.uniform(lo, hi)),
        _bits(sens, exact) / total,  # exactly feasible: the float quotient may round down
        (_bits(sens, exact) - 1) / total if _bits(sens, exact) > lo * total else float(lo),
    ]


@pytest.mark.parametrize("seed", range(30))
def test_exact_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cands = (2, 3, 4)
    sens = _instance(rng, int(rng.integers(3, 8)), cands)
    total = sum(s.params for s in sens.values())
    for budget in _budgets(rng, sens, cands):
        a = allocate_bits(sens, budget, cands)
        assert set(a) == set(sens) and all(b in cands for b in a.values())
        assert _bits(sens, a) <= budget * total + 1e-6
        best = _brute_force(sens, budget, cands)
        assert _cost(sens, a) == pytest.approx(best, rel=1e-9, abs=1e-12)
        greedy = allocate_bits_greedy(sens, budget, cands)
        assert _bits(sens, greedy) <= budget * total + 1e-6
        assert _cost(sens, greedy) >= _cost(sens, a) - 1e-9 * abs(_cost(sens, a))


def test_exactly_feasible_budget_keeps_the_assignment_reachable() -> None:
    # N = 11 weights: (30 / 11) * 11 == 29.999999999999996 in floating point, yet 4*4 + 7*2 = 30
    # bits must still count as within a budget of 30 / 11 bits.
    sens = {
        "a": LayerSensitivity("a", 4, 1.0, {2: 10.0, 3: 1.0, 4: 0.0}),
        "b": LayerSensitivity("b", 7, 1.0, {2: 1.0, 3: 0.5, 4: 0.0}),
    }
    assert (30 / 11) * 11 < 30
    assert allocate_bits(sens, 30 / 11) == {"a": 4, "b": 2}
    assert allocate_bits_greedy(sens, 30 / 11) == {"a": 4, "b": 2}
    for a_bits, b_bits in itertools.product((2, 3, 4), repeat=2):
        target = 4 * a_bits + 7 * b_bits
        a = allocate_bits(sens, target / 11)
        assert _bits(sens, a) <= target
        assert _cost(sens, a) <= _cost(sens, {"a": a_bits, "b": b_bits})


@pytest.mark.parametrize("seed", range(6))
def test_exact_with_wide_candidates(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    cands = (2, 3, 4, 8)
    sens = _instance(rng, 5, cands)
    for budget in (*_budgets(rng, sens, cands), 5.5, 7.99):
        a = allocate_bits(sens, budget, cands)
        assert _cost(sens, a) == pytest.approx(_brute_force(sens, budget, cands), rel=1e-9)
        assert _bits(sens, a) <= budget * sum(s.params for s in sens.values()) + 1e-6


def test_non_monotone_scores_still_exact() -> None:
    rng = np.random.default_rng(7)
    sens = {
        f"l{i}": LayerSensitivity(
            f"l{i}",
            int(rng.integers(10, 500)),
            1.0,
            {b: float(rng.uniform(-1, 1)) for b in (2, 3, 4)},
        )
        for i in range(6)
    }
    for budget in (2.0, 2.7, 3.3, 4.0):
        a = allocate_bits(sens, budget)
        assert _cost(sens, a) == pytest.approx(_brute_force(sens, budget, (2, 3, 4)), rel=1e-9)


def test_edge_budgets_and_errors() -> None:
    sens = _instance(np.random.default_rng(1), 4, (2, 3, 4))
    assert allocate_bits(sens, 4.0) == {k: 4 for k in sens}
    assert allocate_bits(sens, 9.0) == {k: 4 for k in sens}
    assert allocate_bits(sens, 2.0) == {k: 2 for k in sens}
    assert allocate_bits_greedy(sens, 4.5) == {k: 4 for k in sens}
    assert allocate_bits_greedy(sens, 2.0) == {k: 2 for k in sens}
    assert allocate_bits({}, 3.0) == {}
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits(sens, 1.99)
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits_greedy(sens, 1.5)
    with pytest.raises(ValueError, match="empty"):
        allocate_bits(sens, 3.0, candidates=())
    with pytest.raises(ValueError, match="no score"):
        allocate_bits(sens, 3.0, candidates=(2, 3, 4, 8))
    bad = dict(sens, x=LayerSensitivity("x", 10, 1.0, {2: float("nan"), 3: 0.0, 4: 0.0}))
    with pytest.raises(ValueError, match="finite"):
        allocate_bits(bad, 3.0)


def test_frontier_overflow_falls_back_to_greedy() -> None:
    sens = _instance(np.random.default_rng(3), 6, (2, 3, 4))
    with pytest.warns(UserWarning, match="greedy"):
        a = allocate_bits(sens, 3.0, max_states=1)
    assert a == allocate_bits_greedy(sens, 3.0)


def test_greedy_is_suboptimal_on_a_known_case() -> None:
    # Lowering "big" has the best score per bit saved but saves twice what the budget needs.
    sens = {
        "big": LayerSensitivity("big", 100, 1.0, {2: 8.0, 4: 0.0}),
        "s1": LayerSensitivity("s1", 50, 1.0, {2: 6.0, 4: 0.0}),
        "s2": LayerSensitivity("s2", 50, 1.0, {2: 7.0, 4: 0.0}),
    }
    # 800 bits at all-4; a budget of 3.5 bits allows 700, so 100 bits must go.
    exact = allocate_bits(sens, 3.5, (2, 4))
    greedy = allocate_bits_greedy(sens, 3.5, (2, 4))
    assert exact == {"big": 4, "s1": 2, "s2": 4} and _cost(sens, exact) == 6.0
    assert greedy == {"big": 2, "s1": 4, "s2": 4} and _cost(sens, greedy) == 8.0
    # At 3.0 bits, 200 bits must go: "big" alone (8) beats s1 + s2 (13).
    assert allocate_bits(sens, 3.0, (2, 4)) == {"big": 2, "s1": 4, "s2": 4}


def test_bits_report() -> None:
    sens = {
        "a": LayerSensitivity("a", 100, 1.0, {}),
        "b": LayerSensitivity("b", 300, 1.0, {}),
    }
    assert bits_report({"a": 2, "b": 4}, sens) == pytest.approx((3.5, 3.0))
    assert all(math.isnan(v) for v in bits_report({}, sens))


def test_hessian_trace_exact_on_diagonal_quadratic() -> None:
    # loss = 0.5 * sum_b ||W x_b||^2: H = I_out (x) sum_b x_b x_b^T. With x_b = s_b e_b the
    # Gram matrix is diagonal, so every Rademacher probe gives the trace exactly.
    lin = nn.Linear(5, 3, bias=False)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5])
    x1 = torch.diag(scales)
    x2 = 2 * torch.diag(scales)
    batches = [(x1, None), (x2, None)]

    def loss_fn(out, _):
        return 0.5 * out.pow(2).sum()

    traces = hessian_traces(lin, loss_fn, batches, {"w": lin.weight}, probes=3)
    per_batch = [3 * x.pow(2).sum().item() for x in (x1, x2)]
    assert traces["w"] == pytest.approx(sum(per_batch) / 2, rel=1e-5)


def test_hessian_trace_quadratic_general_in_expectation() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False)
    x = torch.randn(10, 6)

    def loss_fn(out, y):
        return F.mse_loss(out, y, reduction="sum") / 2

    y = torch.randn(10, 4)
    est = hessian_traces(lin, loss_fn, [(x, y)], {"w": lin.weight}, probes=400, seed=1)
    exact = 4 * x.pow(2).sum().item()
    assert est["w"] == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("blockwise", [True, False])
def test_hessian_trace_matches_full_hessian_on_tiny_mlp(blockwise: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    names = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    probes = 300 if blockwise else 1000  # the joint estimator is the noisier one
    est = hessian_traces(
        model, F.cross_entropy, [(x, y)], names, probes, seed=3, blockwise=blockwise
    )

    base = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [w.shape for w in names.values()]
    sizes = [w.numel() for w in names.values()]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes, strict=True)]
        p = dict(base, **dict(zip(names, parts, strict=True)))
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    flat = torch.cat([w.detach().reshape(-1) for w in names.values()])
    h = torch.autograd.functional.hessian(f, flat)
    start = 0
    for name, size in zip(names, sizes, strict=True):
        rows = slice(start, start + size)
        start += size
        tr = h[rows, rows].diagonal().sum().item()
        # One probe reads z^T M z with M = H_ll (blockwise) or the rows of l in H (joint);
        # for Rademacher z, Var = 2 * sum_{a != b} S_ab^2 with S the symmetric part of M.
        m = torch.zeros_like(h)
        if blockwise:
            m[rows, rows] = h[rows, rows]
        else:
            m[rows] = h[rows]
        sym = (m + m.T) / 2
        var = 2 * (sym.pow(2).sum() - sym.diagonal().pow(2).sum()).item()
        assert abs(est[name] - tr) <= 5 * math.sqrt(var / probes) + 1e-9
        assert abs(tr) > 5 * math.sqrt(var / probes)  # the check is not vacuous


def test_hessian_traces_restores_state_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model.train()
    model[0].weight.requires_grad_(False)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    params = {"a": model[0].weight, "b": model[2].weight}
    t1 = hessian_traces(model, F.cross_entropy, data, params, probes=4, seed=5)
    t2 = hessian_traces(model, F.cross_entropy, iter(data), params, probes=4, seed=5)
    assert t1 == t2
    assert model.training and not model[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="empty"):
        hessian_traces(model, F.cross_entropy, [], params)


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_layer_sensitivity_on_conv_model() -> None:
    model = _conv_model()
    gen = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    sens = layer_sensitivity(model, F.cross_entropy, loader, probes=4)
    assert list(sens) == ["2", "4", "6"]  # first conv and classifier excluded
    for name, s in sens.items():
        w = model.get_submodule(name).weight
        assert s.params == w.numel() and s.name == name
        assert math.isfinite(s.trace) and s.trace > 0
        assert set(s.omega) == {2, 3, 4}
        assert s.omega[2] >= s.omega[3] >= s.omega[4] > 0
        assert s.omega[3] == pytest.approx(s.trace / s.params * quant_error(w, 3), rel=1e-12)
    assert model.training
    a = allocate_bits(sens, 3.0)
    assert bits_report(a, sens)[0] <= 3.0

    sens_all = layer_sensitivity(
        model, F.cross_entropy, loader, QuantConfig(skip_first=False, skip=("6",)), probes=2
    )
    assert list(sens_all) == ["0", "2", "4"]


def test_layer_sensitivity_rejects_bad_candidates() -> None:
    model = _conv_model()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(ValueError, match="2..8"):
        layer_sensitivity(model, F.cross_entropy, data, candidates=(1, 2))


def test_negative_trace_gives_zero_omega_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2))
    data = [(torch.randn(8, 4), None)]

    def concave(out, _):
        return -0.5 * out.pow(2).sum()  # H = -J^T J: every block negative semi-definite

    with pytest.warns(UserWarning, match="negative Hessian trace"):
        sens = layer_sensitivity(model, concave, data, probes=2)
    assert list(sens) == ["1"]
    assert sens["1"].trace < 0
    assert sens["1"].omega == {2: 0.0, 3: 0.0, 4: 0.0}
