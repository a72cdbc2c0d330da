"""ThresholdQuant with many thresholds (T > 15: runtime/cpp/levels.h, CountMany16, a linear
estimate of the count corrected against the gathered thresholds) against the reference, on every
instruction-set path: evenly spaced thresholds (an 8-bit input quantizer) with values exactly on,
just below and just above every threshold, random sorted thresholds with repeats, infinite
thresholds, NaN and infinite inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime.library import build_library
from runtime.library import session_options as adq_session_options
from runtime.reference.graphs import run_single, single_op_model

OP = "ThresholdQuant"
ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture(scope="module")
def library():
    """Build (if needed) the op library; a build failure is a test failure."""
    return build_library()


def run_ort(x, scale, thr, threads=2):
    inputs = {"X": x, "Scale": scale, "Thresholds": thr}
    model = single_op_model(OP, inputs, {}, constants=("Scale", "Thresholds"))
    so = adq_session_options(num_threads=threads)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def check(x, scale, thr):
    """The kernel's levels equal the reference's exactly."""
    scale = np.array([scale], np.float32)
    thr = np.asarray(thr, np.float32)
    ref = run_single(OP, {"X": x, "Scale": scale, "Thresholds": thr})
    got = run_ort(x, scale, thr)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    bad = np.flatnonzero(got.reshape(-1) != ref.reshape(-1))
    assert bad.size == 0, (
        f"{bad.size} of {ref.size} levels differ, e.g. x={x.reshape(-1)[bad[:4]]} "
        f"got {got.reshape(-1)[bad[:4]]} want {ref.reshape(-1)[bad[:4]]} (T={thr.size})"
    )
    return ref


def around(thr, scale=1.0):
    """Inputs whose product with ``scale`` lies on, just below and just above every threshold
    (where that product is exact: scale 1 or a power of two), plus NaN, +-inf, extremes, in a
    shape with a tail that is not a multiple of 16."""
    t = np.asarray(thr, np.float32) / np.float32(scale)
    vals = [t, np.nextafter(t, np.float32(-np.inf)), np.nextafter(t, np.float32(np.inf))]
    extra = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3e38, -3e38, 1e-30], np.float32)
    x = np.concatenate(vals + [extra, t + np.float32(0.25), t - np.float32(0.25)])
    x = np.concatenate([x, x[::-1][:5]])  # an odd length: the last partial vector
    return x.astype(np.float32).reshape(1, -1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("zp", [0, 77, 128, 255])
def test_uniform_thresholds_of_an_8_bit_quantizer(isa, zp, library, monkeypatch):
    """t_i = i - zp - 0.5 (i = 1..255) at scale 1 and at a power-of-two scale (exact products),
    every threshold hit exactly and by its neighbouring floats."""
    monkeypatch.setenv("ADQ_ISA", isa)
    thr = np.arange(1, 256, dtype=np.float64) - zp - 0.5
    for scale in (np.float32(1.0), np.float32(0.125), np.float32(8.0)):
        q = check(around(thr, scale), scale, thr)
        assert len(np.unique(q)) > 200
    # a random scale: the products round, the levels still follow the float32 product
    rng = np.random.default_rng(zp)
    x = (rng.normal(size=(3, 5001)) * 60).astype(np.float32)
    check(x, np.float32(1.7), thr)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t", [16, 17, 24, 25, 63, 200, 255])
def test_uniform_thresholds_of_any_count(isa, t, library, monkeypatch):
    monkeypatch.setenv("ADQ_ISA", isa)
    rng = np.random.default_rng(t)
    for start, step in ((-3.0, 0.25), (0.5, 1.0), (-1000.0, 7.3), (1e-3, 1e-4)):
        thr = (start + step * np.arange(t)).astype(np.float32)
        check(around(thr), np.float32(1.0), thr)
        x = rng.uniform(start - 2 * step, start + (t + 2) * step, size=4099).astype(np.float32)
        check(x.reshape(1, -1), np.float32(1.0), thr)


@pytest.mark.parametrize("isa", ISAS)
def test_nearly_uniform_thresholds(isa, library, monkeypatch):
    """Evenly spaced thresholds with a few moved by 1-3 ulps, or repeated: where the linear
    estimate alone is exact the kernel counts without corrections (checked at every threshold
    when the thresholds are set up), and a threshold off the grid must not slip through."""
    monkeypatch.setenv("ADQ_ISA", isa)
    rng = np.random.default_rng(11)
    for i in range(60):
        t = int(rng.choice([16, 25, 100, 255]))
        zp = int(rng.integers(0, 256))
        step = np.float32(rng.choice([1.0, 0.5, 2.0**-7, 3.0, 0.1]))
        thr = ((np.arange(1, t + 1) - zp - 0.5) * step).astype(np.float32)
        k = rng.integers(0, t, size=int(rng.integers(1, 4)))
        if i % 3 == 2:
            thr[k[0]] = thr[max(k[0] - 1, 0)]  # a repeat
        else:
            for _ in range(int(rng.integers(1, 4))):
                thr[k] = np.nextafter(thr[k], np.float32(np.inf if i % 2 else -np.inf))
        thr = np.sort(thr)
        check(around(thr), np.float32(1.0), thr)


@pytest.mark.parametrize("isa", ISAS)
def test_random_sorted_thresholds_with_repeats(isa, library, monkeypatch):
    """Arbitrary sorted thresholds (clustered, repeated, spread over orders of magnitude): the
    estimate is far off, the corrections and the binary search still give the exact count."""
    monkeypatch.setenv("ADQ_ISA", isa)
    rng = np.random.default_rng(5)
    for i in range(40):
        t = int(rng.choice([16, 24, 25, 40, 128, 200, 254, 255]))
        kind = i % 4
        if kind == 0:
            thr = rng.normal(size=t)
        elif kind == 1:  # clustered at both ends: the linear estimate is off by many levels
            thr = np.concatenate([rng.normal(-100, 1, t // 2), rng.normal(100, 1, t - t // 2)])
        elif kind == 2:  # orders of magnitude
            thr = np.sign(rng.normal(size=t)) * 10.0 ** rng.uniform(-6, 6, size=t)
        else:  # few distinct values, each repeated
            thr = rng.choice(rng.normal(size=5), size=t)
        thr = np.sort(thr).astype(np.float32)
        if rng.random() < 0.5:
            thr[1 : 1 + t // 3] = thr[1]  # a long run of repeats
            thr = np.sort(thr)
        x = np.concatenate([around(thr).reshape(-1), rng.choice(thr, 300), rng.normal(size=301)])
        scale = np.float32(1.0) if i % 2 else np.float32(rng.uniform(0.3, 3.0))
        check(x.astype(np.float32).reshape(1, -1), scale, thr)


@pytest.mark.parametrize("isa", ISAS)
def test_equal_and_infinite_thresholds(isa, library, monkeypatch):
    """All thresholds equal (zero spacing), infinite first or last thresholds (no finite
    spacing), and thresholds near the float range's ends."""
    monkeypatch.setenv("ADQ_ISA", isa)
    inf = np.float32(np.inf)
    cases = [
        np.full(255, 0.5, np.float32),
        np.full(16, -2.0, np.float32),
        np.concatenate([[-inf], np.linspace(-1, 1, 30), [inf]]).astype(np.float32),
        np.concatenate([np.full(20, -inf), np.linspace(-1, 1, 30)]).astype(np.float32),
        np.concatenate([np.linspace(-1, 1, 30), np.full(100, inf)]).astype(np.float32),
        np.linspace(-3e38, 3e38, 255).astype(np.float32),
        np.linspace(-1e-38, 1e-38, 100).astype(np.float32),
    ]
    for thr in cases:
        for scale in (np.float32(1.0), np.float32(-1.0), np.float32(0.0), np.float32(2.5)):
            check(around(thr[np.isfinite(thr)]), scale, thr)


def test_many_thresholds_in_parallel_chunks(library):
    """A tensor of several parallel chunks (ThresholdQuant splits at 2^15 values)."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 3, 117, 119)).astype(np.float32) * 50
    x.reshape(-1)[::997] = np.nan
    thr = np.arange(1, 256, dtype=np.float32) - np.float32(128.5)
    check(x, np.float32(1.0), thr)
