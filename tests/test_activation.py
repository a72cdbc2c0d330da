"""Activation quantizers: N2UQ (learned thresholds, uniform integer outputs, G-STE) and LSQ.

References are written out in float64 NumPy from method.md, independently of the module code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adq_deploy.quant.activation import LSQ, N2UQ, InputQuant, make_act_quantizer, uniform_count

MIN_WIDTH = 1e-3  # method.md: widths clamped >= 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription stalls on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- NumPy reference


def np_params(m: N2UQ) -> tuple[float, np.ndarray, float, float]:
    return (
        float(m.start.detach().double()),
        m.widths.detach().double().numpy().copy(),
        float(m.alpha1.detach().double()),
        float(m.alpha2.detach().double()),
    )


def np_ends(s: float, a: np.ndarray) -> np.ndarray:
    a = np.maximum(a, MIN_WIDTH)
    return s + np.concatenate([[0.0], np.cumsum(a)])


def np_thresholds(s: float, a: np.ndarray) -> np.ndarray:
    d = np_ends(s, a)
    return d[:-1] + np.maximum(a, MIN_WIDTH) / 2


def np_levels(xs: np.ndarray, s: float, a: np.ndarray) -> np.ndarray:
    """Brute-force count of thresholds T_i <= x'."""
    t = np_thresholds(s, a)
    return (t[None, :] <= xs[:, None]).sum(axis=1)


def np_q_tilde(xs: np.ndarray, s: float, a: np.ndarray) -> np.ndarray:
    """G-STE surrogate: 0 below d_0, L-1 above d_{L-1}, (x'-d_{i-1})/a_i + (i-1) in segment i."""
    L = len(a) + 1
    ac = np.maximum(a, MIN_WIDTH)
    d = np_ends(s, a)
    out = np.zeros_like(xs)
    for i in range(1, L):
        inside = (xs >= d[i - 1]) & (xs < d[i])
        out[inside] = (xs[inside] - d[i - 1]) / ac[i - 1] + (i - 1)
    out[xs >= d[-1]] = L - 1
    return out


def randomized_n2uq(bits: int, seed: int, dtype=torch.float32) -> N2UQ:
    rng = np.random.default_rng(seed)
    L = 2**bits
    m = N2UQ(bits)
    with torch.no_grad():
        m.start.fill_(rng.uniform(-0.5, 0.5))
        m.widths.copy_(torch.from_numpy(rng.uniform(0.3, 1.5, L - 1) * 2 / (L - 1)))
        m.alpha1.fill_(rng.uniform(0.5, 2.0))
        m.alpha2.fill_(rng.uniform(0.5, 2.0))
    return m.to(dtype)


def inputs_away_from(m: N2UQ, points: np.ndarray, n: int, seed: int, gap: float, dtype):
    """Inputs whose scaled value x' spans below d_0 to above d_{L-1}, at least `gap` from points."""
    s, a, alpha1, _ = np_params(m)
    d = np_ends(s, a)
    rng = np.random.default_rng(seed)
    xs = rng.uniform(d[0] - 1.0, d[-1] + 1.0, 4 * n)
    x = torch.from_numpy(xs / alpha1).to(dtype)
    xs64 = alpha1 * x.double().numpy()
    keep = np.min(np.abs(xs64[:, None] - points[None, :]), axis=1) > gap
    x = x[torch.from_numpy(keep)][:n]
    assert x.numel() == n
    return x


# ----------------------------------------------------------------------------- N2UQ forward


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_n2uq_forward_levels_match_threshold_count(bits):
    m = randomized_n2uq(bits, seed=bits)
    s, a, alpha1, alpha2 = np_params(m)
    L = 2**bits
    x = inputs_away_from(m, np_thresholds(s, a), 3000, seed=bits, gap=1e-5, dtype=torch.float32)
    y = m(x).detach()
    q = np_levels(alpha1 * x.double().numpy(), s, a)
    assert q.min() == 0 and q.max() == L - 1, "inputs cover every level"
    np.testing.assert_array_equal(m.levels_of(x).numpy(), q)
    step = m.step().detach()
    # exact: every output is the step times an integer in 0..L-1
    assert torch.equal(y, step * torch.from_numpy(q).to(y.dtype)), (
        f"{(y != step * torch.from_numpy(q).to(y.dtype)).sum().item()} outputs are not exactly "
        "step * q"
    )
    np.testing.assert_allclose(step.double().item(), alpha2 * 2 / (L - 1), rtol=1e-7)
    assert len(np.unique(y.numpy())) == L


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_n2uq_default_init_is_uniform_rounding(bits):
    # s = 0, a_i = 2/(L-1), alpha = 1: thresholds at half steps, so y rounds to the grid on [0, 2]
    m = N2UQ(bits)
    L = 2**bits
    step = 2 / (L - 1)
    x = torch.linspace(-0.7, 2.7, 1001, dtype=torch.float64)
    frac = (x.numpy() / step) % 1.0
    x = x[torch.from_numpy(np.abs(frac - 0.5) > 1e-6)].float()
    expected = np.clip(np.round(x.double().numpy() / step), 0, L - 1)
    np.testing.assert_array_equal(m.levels_of(x).numpy(), expected)
    np.testing.assert_allclose(m(x).detach().double().numpy(), expected * step, rtol=1e-6)


def test_n2uq_widths_clamped_in_forward():
    m = N2UQ(2)
    with torch.no_grad():
        m.widths.copy_(torch.tensor([0.5, -1.0, 0.5]))
    # clamped: d = [0, 0.5, 0.501, 1.001], T = [0.25, 0.5005, 0.751]
    # (unclamped the thresholds would be [0.25, 0.0, -0.25] and x = 0.5003 would give q = 3)
    np.testing.assert_allclose(m.thresholds().detach().double().numpy(), [0.25, 0.5005, 0.751])
    np.testing.assert_allclose(m.segment_ends().detach().double().numpy(), [0, 0.5, 0.501, 1.001])
    x = torch.tensor([0.2, 0.3, 0.5003, 0.5006, 0.76, -0.1])
    np.testing.assert_array_equal(m.levels_of(x).numpy(), [0, 1, 1, 2, 3, 0])
    y = m(x)
    (y * torch.arange(1.0, 7.0)).sum().backward()
    assert torch.isfinite(m.widths.grad).all()
    assert m.widths.grad[1].item() == 0.0, "a clamped width gets no gradient"
    # x = 0.5003 lies in the clamped segment [0.5, 0.501): dy/dx = step * alpha1 / 1e-3
    x2 = torch.tensor([0.5003], requires_grad=True)
    m(x2).sum().backward()
    assert x2.grad.item() == pytest.approx((2 / 3) / MIN_WIDTH, rel=1e-3)


def test_n2uq_exact_boundary_conventions():
    # dyadic parameters, so thresholds and segment ends are exact:
    # d = [0, 0.25, 0.75, 1.75], T = [0.125, 0.5, 1.25]
    m = N2UQ(2)
    with torch.no_grad():
        m.widths.copy_(torch.tensor([0.25, 0.5, 1.0]))
    # forward: x' >= T_i counts, so an input exactly on a threshold goes up
    x = torch.tensor([0.125, 0.5, 1.25, 0.124, 0.499])
    np.testing.assert_array_equal(m.levels_of(x).numpy(), [1, 2, 3, 0, 1])
    # backward: segments are half-open [d_{i-1}, d_i), slope 1 / a_i
    x = torch.tensor([0.0, 0.25, 0.75, 1.75, -0.01], requires_grad=True)
    m(x).sum().backward()
    step = 2 / 3
    expected = step * np.array([1 / 0.25, 1 / 0.5, 1 / 1.0, 0.0, 0.0])
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", [0, 9])
def test_n2uq_invalid_bits(bits):
    with pytest.raises(ValueError):
        N2UQ(bits)


# ----------------------------------------------------------------------------- N2UQ gradients


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_n2uq_gradients_match_gste(bits, dtype):
    L = 2**bits
    c = 2 / (L - 1)
    m = randomized_n2uq(bits, seed=10 + bits, dtype=dtype)
    s, a, alpha1, alpha2 = np_params(m)
    ends = np_ends(s, a)
    x = inputs_away_from(m, ends, 400, seed=bits, gap=1e-4, dtype=dtype).requires_grad_(True)
    g = torch.from_numpy(np.random.default_rng(bits).normal(size=x.numel())).to(dtype)
    (m(x) * g).sum().backward()

    xn = x.detach().double().numpy()
    gn = g.double().numpy()
    xs = alpha1 * xn
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)

    # (a) closed forms: dy/dx = alpha2 c alpha1 / a_i inside segment i, 0 outside; dy/dalpha2 = c q
    seg = np.searchsorted(ends, xs, side="right")  # i such that d_{i-1} <= x' < d_i
    inside = (seg >= 1) & (seg <= L - 1)
    assert inside.any() and (~inside).any()
    dydx = np.zeros_like(xn)
    dydx[inside] = alpha2 * c * alpha1 / np.maximum(a, MIN_WIDTH)[seg[inside] - 1]
    np.testing.assert_allclose(x.grad.double().numpy(), gn * dydx, **tol)
    q = np_levels(xs, s, a)
    np.testing.assert_allclose(m.alpha2.grad.double().item(), c * np.sum(gn * q), **tol)

    # (b) central finite differences of alpha2 c sum(g q~(alpha1 x; s, a)) in float64
    def f(s_: float, a_: np.ndarray, alpha1_: float) -> float:
        return alpha2 * c * float(np.sum(gn * np_q_tilde(alpha1_ * xn, s_, a_)))

    h = 1e-6
    fd_s = (f(s + h, a, alpha1) - f(s - h, a, alpha1)) / (2 * h)
    fd_alpha1 = (f(s, a, alpha1 + h) - f(s, a, alpha1 - h)) / (2 * h)
    fd_a = np.empty_like(a)
    for i in range(len(a)):
        e = np.zeros_like(a)
        e[i] = h
        fd_a[i] = (f(s, a + e, alpha1) - f(s, a - e, alpha1)) / (2 * h)
    fd_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(m.start.grad.double().item(), fd_s, **fd_tol)
    np.testing.assert_allclose(m.alpha1.grad.double().item(), fd_alpha1, **fd_tol)
    np.testing.assert_allclose(m.widths.grad.double().numpy(), fd_a, **fd_tol)
    # the gradients are not trivially zero
    assert abs(fd_s) > 1e-3 and abs(fd_alpha1) > 1e-3 and np.abs(fd_a).max() > 1e-3


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_n2uq_closed_form_backward_equals_autograd_of_reference(bits, fused):
    """forward() (closed-form backward; torch.compile'd when fused) == autograd of the method."""
    m = randomized_n2uq(bits, seed=40 + bits, dtype=torch.float32)
    m.fused = fused
    x = torch.randn(2, 3, 17, 19, generator=torch.Generator().manual_seed(bits)) * 1.5 + 0.7
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
    grads = []
    for fn in (m.forward, m.reference_forward):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        (y * g).sum().backward()
        grads.append([y.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert all(t.abs().sum() > 0 for t in grads[0][1:])


def test_n2uq_surrogate_closed_form_values():
    m = randomized_n2uq(3, seed=42, dtype=torch.float64)
    s, a, alpha1, _ = np_params(m)
    x = inputs_away_from(m, np_ends(s, a), 500, seed=1, gap=1e-6, dtype=torch.float64)
    xs = alpha1 * x.numpy()
    got = m.surrogate(m.scale_in() * x).detach().numpy()
    np.testing.assert_allclose(got, np_q_tilde(xs, s, a), rtol=1e-12, atol=1e-12)
    # the surrogate is the expectation of stochastic rounding: within 1/2 of the hard level
    assert np.all(np.abs(got - np_levels(xs, s, a)) <= 0.5 + 1e-12)


# ----------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_lsq_init_levels_and_gradients(bits):
    qp = 2**bits - 1
    m = LSQ(bits).train()
    rng = np.random.default_rng(bits)
    x1 = torch.from_numpy(rng.normal(0.3, 1.0, 2000)).float()
    y1 = m(x1).detach()
    step0 = 2 * np.abs(x1.double().numpy()).mean() / math.sqrt(qp)
    assert m.step().item() == pytest.approx(step0, rel=1e-5)
    assert bool(m.initialized)
    step = m.step().detach()
    q = np.clip(np.round(x1.numpy() / step.numpy()), 0, qp)
    assert torch.equal(y1, step * torch.from_numpy(q).float())
    np.testing.assert_array_equal(m.levels_of(x1).numpy(), q)
    assert q.min() == 0 and q.max() >= min(qp, 3)

    # a second training batch does not re-initialize the step
    x2 = x1 * 5
    xg = x2.clone().requires_grad_(True)
    g = torch.from_numpy(rng.normal(size=x2.numel())).float()
    (m(xg) * g).sum().backward()
    assert m.step().item() == pytest.approx(step0, rel=1e-5)

    s = m.step().item()
    xn = x2.double().numpy()
    v = xn / s
    margin = 1e-4
    inside = (v > margin) & (v < qp - margin)
    below, above = v < -margin, v > qp + margin
    assert inside.any() and below.any() and above.any()
    gx = xg.grad.double().numpy()
    # d(clamp(x / s) * s)/dx = (1 / s) * s: one up to float32 rounding
    np.testing.assert_allclose(gx[inside], g.double().numpy()[inside], rtol=1e-6, atol=0)
    assert np.all(gx[below] == 0) and np.all(gx[above] == 0)

    # step gradient: LSQ's d y / d s (round(v) - v inside, 0 below, Q_p above) times the scale
    dyds = np.where(v < 0, 0.0, np.where(v > qp, float(qp), np.round(v) - v))
    expected = np.sum(g.double().numpy() * dyds) / math.sqrt(xn.size * qp)
    assert m.step_size.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_lsq_eval_does_not_initialize():
    m = LSQ(2).eval()
    x = torch.linspace(-1, 10, 50)
    y = m(x)
    assert not bool(m.initialized) and m.step().item() == 1.0
    np.testing.assert_array_equal(y.detach().numpy(), np.clip(np.round(x.numpy()), 0, 3))


# ----------------------------------------------------------------------------- InputQuant


def edge_values(t: torch.Tensor) -> torch.Tensor:
    """Every threshold, its float32 neighbours, huge values, infinities and NaN."""
    up, down = torch.tensor(float("inf")), torch.tensor(float("-inf"))
    base = torch.cat([t, torch.tensor([0.0, 1e9, -1e9, 3e38, -3e38, 2.0**22, -(2.0**22)])])
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    return torch.cat([base, torch.nextafter(base, up), torch.nextafter(base, down), special])


def brute_count(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """#{i : xs >= t_i} by comparing with every threshold (NaN: 0), in float64."""
    return (xs.double()[:, None] >= t.double()[None, :]).sum(1).double()


@pytest.mark.parametrize("zp", [0, 1, 77, 128, 254, 255])
def test_uniform_count_is_the_exact_threshold_count(zp):
    """floor + clip + one correction each way equals the brute-force count everywhere, on and
    next to every threshold, far outside the range and for inf / NaN."""
    t = torch.arange(1, 256, dtype=torch.float32) - zp - 0.5
    gen = torch.Generator().manual_seed(zp)
    xs = torch.cat([edge_values(t), torch.randn(20000, generator=gen) * 200])
    got = uniform_count(xs, torch.tensor(0.5 - zp), 255)
    np.testing.assert_array_equal(got.double().numpy(), brute_count(xs, t).numpy())


def test_uniform_count_needs_its_corrections():
    """Without the corrections the floor is off by one next to a threshold (the subtraction
    rounds up), so the test above can fail: 128 - 2^-25 rounds to 128."""
    xs = torch.tensor([0.5 - 2.0**-25])  # just below the threshold 0.5 (zp 128, i = 129)
    t0 = torch.tensor(-127.5)
    assert float(torch.floor(xs - t0) + 1) == 129.0
    assert (
        float(uniform_count(xs, t0, 255)) == 128.0 == float(brute_count(xs, t0 + torch.arange(255)))
    )


def test_input_quant_calibration_levels_and_values():
    m = InputQuant(8)
    x = torch.linspace(-1.3, 2.9, 1001)
    m.train()(x)
    s, z = m.step().item(), int(m.zero_point)
    assert bool(m.initialized)
    assert s == pytest.approx(4.2 / 255, rel=1e-6) and z == round(1.3 / s)
    # zero is a level; the grid spans the batch up to half a step of zero-point rounding
    np.testing.assert_array_equal(m.thresholds().numpy(), np.arange(1, 256) - z - 0.5)
    assert m.thresholds().dtype == torch.float32
    xs = edge_values(m.thresholds()) / np.float32(m.scale_in())
    xs = torch.cat([xs, x])
    q = m.levels_of(xs)
    np.testing.assert_array_equal(q.numpy(), brute_count(m.scale_in() * xs, m.thresholds()))
    y = m.eval()(xs)
    finite = torch.isfinite(xs)
    expected = (q.double() - z) * s
    np.testing.assert_allclose(y[finite].double().numpy(), expected[finite].numpy(), rtol=1e-6)
    assert m(torch.zeros(3)).eq(0).all()  # zero padding is level z: value 0
    assert int(m.levels_of(torch.zeros(1))) == z
    # calibration includes zero: all-positive input -> z = 0, all-negative -> z = 255
    pos, neg = InputQuant(8).train(), InputQuant(8).train()
    pos(torch.rand(100) + 1)
    neg(-torch.rand(100) - 1)
    assert int(pos.zero_point) == 0 and int(neg.zero_point) == 255


def test_input_quant_straight_through_gradient():
    """Gradient 1 inside the representable range [-z s, (255 - z) s], 0 outside."""
    m = InputQuant(8).train()
    m(torch.linspace(-1.0, 1.0, 100))
    s, z = m.step().item(), int(m.zero_point)
    lo, hi = -z * s, (255 - z) * s
    x = torch.tensor([lo - 0.5, lo + 0.1, 0.0, 0.3, hi - 0.1, hi + 0.5], requires_grad=True)
    m(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 1, 1, 0])


def test_input_quant_eval_does_not_calibrate_and_bits():
    m = InputQuant(8).eval()
    m(torch.linspace(-5, 5, 10))
    assert not bool(m.initialized) and m.step().item() == 1.0 and int(m.zero_point) == 0
    assert InputQuant(4).thresholds().numel() == 15
    for bits in (1, 9):
        with pytest.raises(ValueError):
            InputQuant(bits)


# ----------------------------------------------------------------------------- factory


def test_make_act_quantizer():
    assert isinstance(make_act_quantizer("n2uq", 3), N2UQ)
    assert make_act_quantizer("n2uq", 3).bits == 3
    assert isinstance(make_act_quantizer("lsq", 2), LSQ)
    with pytest.raises(ValueError):
        make_act_quantizer("pact", 2)
    with pytest.raises(ValueError):
        make_act_quantizer("lsq", 0)
