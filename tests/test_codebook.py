"""ADQ weight codebook: init rules, assignment, straight-through forward and the EMA step.

Every expected value is computed independently (NumPy, float64, closed forms, brute force).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adq_deploy.quant.codebook import (
    CodebookQuantizer,
    assign,
    codebook_size,
    init_codebook,
    quantile_sorted,
    side_counts,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription stalls on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _normal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


def _asymmetric(seed: int = 1) -> torch.Tensor:
    """3 positives for every negative, with different scales a side."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(3000, generator=g) * 2.0 + 1e-3
    neg = -torch.rand(1000, generator=g) * 0.5 - 1e-3
    w = torch.cat([pos, neg])
    return w[torch.randperm(w.numel(), generator=g)]


def _np_side_quantiles(mags: np.ndarray, k: int) -> np.ndarray:
    return np.array([np.quantile(mags, (j - 0.5) / k) for j in range(1, k + 1)], dtype=np.float64)


def _brute_assign(w: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """argmin_k |w - C_k| in float64; np.argmin takes the first (lower) index on a tie."""
    return np.argmin(np.abs(w.astype(np.float64)[:, None] - cb.astype(np.float64)[None, :]), axis=1)


# ----------------------------------------------------------------------------- sizes and checks


@pytest.mark.parametrize("bits", range(2, 9))
def test_codebook_size_both_forms(bits):
    assert codebook_size(bits, "full") == 2**bits
    assert codebook_size(bits, "symmetric") == 2**bits - 1
    w = _normal(5000, seed=bits)
    assert init_codebook(w, bits, "full").numel() == 2**bits
    assert init_codebook(w, bits, "symmetric").numel() == 2**bits - 1
    assert CodebookQuantizer(bits, form="full").codebook.numel() == 2**bits
    assert CodebookQuantizer(bits, form="symmetric").codebook.numel() == 2**bits - 1


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_invalid_bits_raise(bits):
    with pytest.raises(ValueError):
        CodebookQuantizer(bits)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_invalid_beta_raises(beta):
    with pytest.raises(ValueError):
        CodebookQuantizer(3, beta=beta)


def test_invalid_init_and_form_raise():
    with pytest.raises(ValueError):
        CodebookQuantizer(3, init="median")
    with pytest.raises(ValueError):
        init_codebook(_normal(100), 3, init="median")
    with pytest.raises(ValueError):
        codebook_size(3, "half")
    with pytest.raises(ValueError):
        init_codebook(_normal(100), 3, form="half")


# ----------------------------------------------------------------------------- side split rules


def test_side_counts_rules():
    # symmetric: K = (2^b - 2) / 2 levels a side, whatever the counts
    assert side_counts(6, 10, 1000, "symmetric") == (3, 3)
    assert side_counts(14, 0, 5, "symmetric") == (7, 7)
    # full: 2^b - 1 non-zero levels shared in proportion to the counts (round half up)
    assert side_counts(7, 500, 500, "full") == (3, 4)  # 3.5 positives -> 4
    assert side_counts(7, 250, 750, "full") == (2, 5)  # 5.25 -> 5
    assert side_counts(3, 100, 900, "full") == (1, 2)  # 2.7 -> 3, clamped so each side keeps 1
    assert side_counts(3, 900, 100, "full") == (2, 1)  # 0.3 -> 0, clamped up to 1
    assert side_counts(15, 1, 999, "full") == (1, 14)
    # one side empty: everything goes to the other side
    assert side_counts(7, 0, 10, "full") == (0, 7)
    assert side_counts(7, 10, 0, "full") == (7, 0)


def _split_levels(cb: torch.Tensor):
    c = cb.double().numpy()
    return c[c < 0], c[c == 0], c[c > 0]


# ----------------------------------------------------------------------------- quantile init


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("form", ["full", "symmetric"])
@pytest.mark.parametrize("which", ["normal", "asymmetric"])
def test_quantile_init_matches_numpy(bits, form, which):
    w = _normal(4001, seed=3) if which == "normal" else _asymmetric()
    wn = w.double().numpy()
    pos, negmag = wn[wn > 0], -wn[wn < 0]
    size = 2**bits if form == "full" else 2**bits - 1
    if form == "symmetric":
        k_neg = k_pos = (size - 1) // 2
    else:
        # independent restatement of the proportional rule
        k_pos = math.floor((size - 1) * len(pos) / (len(pos) + len(negmag)) + 0.5)
        k_pos = min(max(k_pos, 1), size - 2)
        k_neg = size - 1 - k_pos
    cb = init_codebook(w, bits, form, "quantile")
    assert cb.numel() == size
    assert torch.all(cb[1:] > cb[:-1]), "levels sorted and distinct"
    neg_l, zero_l, pos_l = _split_levels(cb)
    assert len(zero_l) == 1
    assert len(neg_l) == k_neg and len(pos_l) == k_pos
    np.testing.assert_allclose(pos_l, _np_side_quantiles(pos, k_pos), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        neg_l, -_np_side_quantiles(negmag, k_neg)[::-1], rtol=1e-6, atol=1e-7
    )


def test_asymmetric_full_split_is_proportional():
    # 3000 positives, 1000 negatives, bits 3: 7 non-zero levels, 7 * 0.75 = 5.25 -> 5 positive
    cb = init_codebook(_asymmetric(), 3, "full")
    neg_l, zero_l, pos_l = _split_levels(cb)
    assert (len(neg_l), len(zero_l), len(pos_l)) == (2, 1, 5)
    cbs = init_codebook(_asymmetric(), 3, "symmetric")
    neg_l, zero_l, pos_l = _split_levels(cbs)
    assert (len(neg_l), len(zero_l), len(pos_l)) == (3, 1, 3)


def test_quantile_init_ignores_exact_zeros():
    w = torch.cat([torch.zeros(1000), _normal(2000, seed=7)])
    wn = w.double().numpy()
    cb = init_codebook(w, 2, "symmetric")
    # one level a side at the side median
    np.testing.assert_allclose(
        cb.double().numpy(),
        [-np.median(-wn[wn < 0]), 0.0, np.median(wn[wn > 0])],
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------- quantile_sorted


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 12345])
def test_quantile_sorted_matches_numpy(n):
    g = torch.Generator().manual_seed(n)
    data = torch.randn(n, generator=g, dtype=torch.float64).sort().values
    q = torch.rand(64, generator=g, dtype=torch.float64)
    q = torch.cat([q, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)])
    got = quantile_sorted(data, q).numpy()
    np.testing.assert_allclose(got, np.quantile(data.numpy(), q.numpy()), rtol=1e-12, atol=1e-12)


def test_quantile_sorted_above_2_24_elements():
    n = 2**24 + 5
    data = torch.arange(n, dtype=torch.float64)  # sorted; quantile at q is q * (n - 1) exactly
    g = torch.Generator().manual_seed(0)
    q = torch.cat([torch.rand(40, generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0])])
    got = quantile_sorted(data, q)
    np.testing.assert_allclose(got.numpy(), q.numpy() * (n - 1), rtol=1e-12, atol=1e-6)


def test_init_codebook_above_2_24_elements_without_torch_quantile(monkeypatch):
    n = 2**24 + 5
    half = 2**23
    # integers -2^23 .. 2^23 + 4, all exact in float32: magnitudes 1..2^23 a side (+4 positive)
    w = torch.arange(n, dtype=torch.float32) - half

    def refuse(*args, **kwargs):
        raise AssertionError("init_codebook must not call torch.quantile")

    monkeypatch.setattr(torch, "quantile", refuse)
    monkeypatch.setattr(torch.Tensor, "quantile", refuse)
    cb = init_codebook(w, 2, "full", "quantile").double().numpy()
    # 3 non-zero levels; positives (2^23 + 4) outnumber negatives (2^23): 1.5+ -> 2 positive
    n_neg, n_pos = half, half + 4

    def side_q(count: int, k: int) -> list[float]:  # quantile of 1..count at (j - 0.5) / k
        return [1 + (j - 0.5) / k * (count - 1) for j in range(1, k + 1)]

    expected = [-v for v in side_q(n_neg, 1)[::-1]] + [0.0] + side_q(n_pos, 2)
    np.testing.assert_allclose(cb, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- uniform / kmeans


@pytest.mark.parametrize("form", ["full", "symmetric"])
def test_uniform_init_equally_spaced_per_side(form):
    w = _asymmetric()
    wn = w.double().numpy()
    cb = init_codebook(w, 3, form, "uniform")
    neg_l, zero_l, pos_l = _split_levels(cb)
    assert len(zero_l) == 1
    kp, kn = len(pos_l), len(neg_l)
    assert (kn, kp) == ((2, 5) if form == "full" else (3, 3))
    np.testing.assert_allclose(pos_l, wn.max() * np.arange(1, kp + 1) / kp, rtol=1e-6)
    np.testing.assert_allclose(neg_l, wn.min() * np.arange(kn, 0, -1) / kn, rtol=1e-6)


def _mse(w: torch.Tensor, cb: torch.Tensor) -> float:
    wn = w.double().numpy()
    c = cb.double().numpy()
    return float(np.mean((wn - c[_brute_assign(wn, c)]) ** 2))


def _bimodal(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "two_bumps":
        return torch.cat(
            [
                torch.randn(3000, generator=g) * 0.05 + 0.6,
                torch.randn(2000, generator=g) * 0.1 - 0.8,
            ]
        )
    # positive side: a dense bump near 0.1 and a small far bump at 2.0, where quantiles are poor
    return torch.cat(
        [
            torch.randn(2400, generator=g) * 0.02 + 0.1,
            torch.randn(600, generator=g) * 0.05 + 2.0,
            torch.randn(2000, generator=g) * 0.1 - 0.5,
        ]
    )


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("kind", ["two_bumps", "far_bump"])
def test_kmeans_not_worse_than_quantile_on_bimodal(bits, kind):
    w = _bimodal(kind)
    cq = init_codebook(w, bits, "full", "quantile")
    ck = init_codebook(w, bits, "full", "kmeans")
    assert ck.numel() == cq.numel()
    assert torch.all(ck[1:] >= ck[:-1])
    assert (ck == 0).sum() == 1, "k-means keeps the zero level pinned"
    assert _mse(w, ck) <= _mse(w, cq) + 1e-12


def test_kmeans_finds_far_mode_quantile_misses():
    w = _bimodal("far_bump")
    cq = init_codebook(w, 2, "full", "quantile")
    ck = init_codebook(w, 2, "full", "kmeans")
    assert cq.max() < 0.5  # both positive quantile levels sit in the dense bump
    assert ck.max() == pytest.approx(2.0, abs=0.05)
    assert _mse(w, ck) < 0.1 * _mse(w, cq)


def test_kmeans_is_lloyd_fixed_point():
    g = torch.Generator().manual_seed(11)
    w = torch.cat([torch.randn(1500, generator=g) * 0.2 + 1.0, -torch.rand(500, generator=g)])
    ck = init_codebook(w, 2, "full", "kmeans", kmeans_iters=200)
    c = ck.double().numpy()
    wn = w.double().numpy()
    idx = _brute_assign(wn, c)
    for k, level in enumerate(c):
        if level != 0 and np.any(idx == k):
            assert level == pytest.approx(wn[idx == k].mean(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- assignment


def test_assignment_is_nearest_level_random():
    w = _normal(20000, seed=9) * 1.5
    cb = init_codebook(w, 3, "full")
    got = assign(w, cb).numpy()
    np.testing.assert_array_equal(got, _brute_assign(w.numpy(), cb.numpy()))
    q = CodebookQuantizer(3, weight=w)
    np.testing.assert_array_equal(q.codes(w).numpy(), _brute_assign(w.numpy(), q.codebook.numpy()))


def test_assignment_ties_go_to_lower_index():
    cb = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.75])  # dyadic: midpoints are exact
    mids = (cb[1:] + cb[:-1]) / 2
    w = torch.cat([mids, cb, torch.tensor([-5.0, 5.0, 0.1, -0.3])])
    got = assign(w, cb).numpy()
    expected = _brute_assign(w.numpy(), cb.numpy())
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got[:4], [0, 1, 2, 3])  # each midpoint -> lower level


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("form", ["full", "symmetric"])
def test_forward_equals_codebook_levels(form):
    w = _normal(5000, seed=2)
    q = CodebookQuantizer(3, form=form, ema=False, weight=w)
    out = q(w.clone().requires_grad_(True))
    expected = q.codebook[torch.from_numpy(_brute_assign(w.numpy(), q.codebook.numpy()))]
    assert torch.equal(out.detach(), expected), (
        f"{(out.detach() != expected).sum().item()} quantized weights are not exactly a level"
    )
    assert set(out.detach().unique().tolist()) <= set(q.codebook.tolist())


def test_straight_through_gradient_is_identity():
    w0 = _normal(3000, seed=4) * 2
    q = CodebookQuantizer(2, ema=False, weight=w0)
    w = w0.clone().requires_grad_(True)
    g = _normal(3000, seed=5)
    (q(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    # clip_grad=False: even the weights beyond [C_min, C_max] get gradient
    assert ((w0 < q.codebook[0]) | (w0 > q.codebook[-1])).any()


def test_clip_grad_zero_outside_range():
    w0 = _normal(3000, seed=4) * 2
    q = CodebookQuantizer(2, ema=False, clip_grad=True, weight=w0)
    w = w0.clone().requires_grad_(True)
    g = _normal(3000, seed=5)
    (q(w) * g).sum().backward()
    lo, hi = q.codebook[0].item(), q.codebook[-1].item()
    outside = (w0 < lo) | (w0 > hi)
    assert outside.sum() > 10 and (~outside).sum() > 10
    assert torch.equal(w.grad[~outside], g[~outside])
    assert torch.all(w.grad[outside] == 0)


# ----------------------------------------------------------------------------- EMA


def _np_ema(cb: np.ndarray, w: np.ndarray, beta: float) -> np.ndarray:
    idx = _brute_assign(w, cb)
    new = cb.astype(np.float64).copy()
    for k in range(len(cb)):
        sel = idx == k
        if cb[k] != 0 and sel.any():
            new[k] = beta * cb[k] + (1 - beta) * w.astype(np.float64)[sel].mean()
    return np.sort(new)


@pytest.mark.parametrize("beta", [0.9, 0.99])
@pytest.mark.parametrize("form", ["full", "symmetric"])
def test_ema_step_moves_levels_toward_means(beta, form):
    w0 = _normal(4000, seed=6)
    q = CodebookQuantizer(3, form=form, beta=beta, weight=w0)
    q.train()
    old = q.codebook.clone()
    w1 = (w0 + 0.1).requires_grad_(True)
    q(w1)
    expected = _np_ema(old.numpy(), w1.detach().numpy(), beta)
    np.testing.assert_allclose(q.codebook.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(q.codebook, old)
    assert (q.codebook == 0).sum() == 1, "zero level stays zero"
    assert torch.all(q.codebook[1:] > q.codebook[:-1])
    # each non-zero level moved strictly toward the mean of the weights it was assigned
    o = old.double().numpy()
    wn = w1.detach().double().numpy()
    idx = _brute_assign(wn, o)
    new = q.codebook.double().numpy()  # same order: a 0.1 shift does not reorder these levels
    for k in np.flatnonzero(o != 0):
        mean_k = wn[idx == k].mean()
        assert abs(new[k] - mean_k) < abs(o[k] - mean_k)
        assert np.sign(new[k] - o[k]) == np.sign(mean_k - o[k])


def test_ema_leaves_empty_levels_unchanged():
    q = CodebookQuantizer(2, form="full", beta=0.9)
    q.codebook.copy_(torch.tensor([-10.0, 0.0, 0.5, 1.0]))  # nothing near -10
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(1000, generator=g) * 1.2 - 0.1).requires_grad_(True)
    assert (w.detach() < -5).sum() == 0
    q.train()
    q(w)
    expected = _np_ema(np.array([-10.0, 0.0, 0.5, 1.0]), w.detach().numpy(), 0.9)
    assert q.codebook[0].item() == -10.0
    assert q.codebook[1].item() == 0.0
    np.testing.assert_allclose(q.codebook.double().numpy(), expected, rtol=1e-6)


def test_ema_off_in_eval_no_grad_or_disabled():
    w0 = _normal(2000, seed=8)
    shifted = (w0 + 0.1).requires_grad_(True)

    q = CodebookQuantizer(3, ema=False, weight=w0).train()
    before = q.codebook.clone()
    q(shifted)
    assert torch.equal(q.codebook, before)

    q = CodebookQuantizer(3, ema=True, weight=w0).eval()
    before = q.codebook.clone()
    q(shifted)
    assert torch.equal(q.codebook, before)

    q = CodebookQuantizer(3, ema=True, weight=w0).train()
    before = q.codebook.clone()
    with torch.no_grad():
        q(shifted)
    assert torch.equal(q.codebook, before)
    # control: the same quantizer does move once grad is enabled
    q(shifted)
    assert not torch.equal(q.codebook, before)


def test_ema_converges_to_per_level_means():
    g = torch.Generator().manual_seed(12)
    w = (torch.randn(3000, generator=g) * 0.5 + 0.05).requires_grad_(True)
    q = CodebookQuantizer(3, form="full", beta=0.5, weight=w.detach() * 2.0).train()
    for _ in range(150):
        q(w)
    c = q.codebook.double().numpy()
    wn = w.detach().double().numpy()
    idx = _brute_assign(wn, c)
    assert (c == 0).sum() == 1
    checked = 0
    for k, level in enumerate(c):
        if level != 0 and np.any(idx == k):
            assert level == pytest.approx(wn[idx == k].mean(), rel=1e-4, abs=1e-5)
            checked += 1
    assert checked >= 5
    # a Lloyd fixed point quantizes no worse than the stretched starting codebook
    assert _mse(w.detach(), q.codebook) < _mse(w.detach(), init_codebook(w.detach() * 2.0, 3))
