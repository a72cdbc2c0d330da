"""Benchmark (not a test): ai.adq LutConv / LutGemm vs onnxruntime's own fp32 Conv / Gemm.

Same shapes and the same weight values on both sides: the LutConv graph holds packed codes, a
codebook, Scale and Bias as initializers and takes uint8 levels; the baseline holds the decoded
fp32 weights and takes the same levels as float. Reports the best and median time of `--repeat`
runs and GFLOP/s (2 * MACs / best time).

    .venv/bin/python runtime/cpp/bench_ops.py --threads 1 2 --repeat 30
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
from onnx import numpy_helper

from runtime.library import build_library, session_options
from runtime.packing import pack_rows
from runtime.schema import DOMAIN, VERSION

LUT_INPUTS = ["X", "codes", "cb", "s", "b"]
# name, N, C, H, W, M, k, stride, group
CONV_SHAPES = [
    ("resnet20 s1 16ch 32x32", 1, 16, 32, 32, 16, 3, 1, 1),
    ("resnet20 s3 64ch 8x8", 1, 64, 8, 8, 64, 3, 1, 1),
    ("resnet20 s1 batch 32", 32, 16, 32, 32, 16, 3, 1, 1),
    ("resnet18 64ch 56x56", 1, 64, 56, 56, 64, 3, 1, 1),
    ("resnet18 128ch 28x28", 1, 128, 28, 28, 128, 3, 1, 1),
    ("resnet18 256ch 14x14 s2", 1, 128, 28, 28, 256, 3, 2, 1),
    ("resnet18 512ch 7x7", 1, 512, 7, 7, 512, 3, 1, 1),
    ("pointwise 1x1 128->256 28x28", 1, 128, 28, 28, 256, 1, 1, 1),
    ("depthwise 3x3 128ch 28x28", 1, 128, 28, 28, 128, 3, 1, 128),
]
# name, N, Kin, M
GEMM_SHAPES = [
    ("fc 512->10 batch 1", 1, 512, 10),
    ("fc 512->1000 batch 1", 1, 512, 1000),
    ("fc 2048->1000 batch 1", 1, 2048, 1000),
    ("fc 512->1000 batch 64", 64, 512, 1000),
]


def _model(nodes, inputs, outputs, inits, adq):
    opsets = [oh.make_opsetid("", 17)] + ([oh.make_opsetid(DOMAIN, VERSION)] if adq else [])
    graph = oh.make_graph(nodes, "bench", inputs, outputs, initializer=inits)
    return oh.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def _time(sess, feeds, repeat):
    sess.run(None, feeds)  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


def _lut_inits(codes, codebook, scale, bias, bits):
    arrays = {"codes": pack_rows(codes, bits), "cb": codebook, "s": scale, "b": bias}
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def _weights(rng, bits, m, r):
    k = 1 << bits
    codes = rng.integers(0, k, size=(m, r))
    codebook = np.sort(rng.normal(size=k)).astype(np.float32)
    return codes, codebook


def bench_conv(shape, bits, threads, repeat, rng):
    name, n, c, h, w, m, k, s, g = shape
    pad = k // 2
    r = (c // g) * k * k
    codes, codebook = _weights(rng, bits, m, r)
    wf = codebook[codes].reshape(m, c // g, k, k)
    scale = rng.uniform(0.5, 1.5, size=m).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    x = rng.integers(0, 16, size=(n, c, h, w), dtype=np.uint8)
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4, group=g)
    T = onnx.TensorProto
    adq = _model(
        [oh.make_node("LutConv", LUT_INPUTS, ["Y"], domain=DOMAIN, bits=bits, **attrs)],
        [oh.make_tensor_value_info("X", T.UINT8, list(x.shape))],
        [oh.make_tensor_value_info("Y", T.FLOAT, None)],
        _lut_inits(codes, codebook, scale, bias, bits),
        adq=True,
    )
    # fp32 baseline: Conv with the decoded weights (scale folded in) and a bias.
    fp32 = _model(
        [oh.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)],
        [oh.make_tensor_value_info("X", T.FLOAT, list(x.shape))],
        [oh.make_tensor_value_info("Y", T.FLOAT, None)],
        [
            numpy_helper.from_array((wf * scale[:, None, None, None]).astype(np.float32), "W"),
            numpy_helper.from_array(bias, "B"),
        ],
        adq=False,
    )
    oh_ = (h + 2 * pad - k) // s + 1
    flops = 2.0 * n * m * oh_ * oh_ * r
    return _compare(name, adq, {"X": x}, fp32, {"X": x.astype(np.float32)}, flops, threads, repeat)


def bench_gemm(shape, bits, threads, repeat, rng):
    name, n, kin, m = shape
    codes, codebook = _weights(rng, bits, m, kin)
    wf = codebook[codes]
    scale = rng.uniform(0.5, 1.5, size=m).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    x = rng.integers(0, 16, size=(n, kin), dtype=np.uint8)
    T = onnx.TensorProto
    adq = _model(
        [oh.make_node("LutGemm", LUT_INPUTS, ["Y"], domain=DOMAIN, bits=bits)],
        [oh.make_tensor_value_info("X", T.UINT8, list(x.shape))],
        [oh.make_tensor_value_info("Y", T.FLOAT, None)],
        _lut_inits(codes, codebook, scale, bias, bits),
        adq=True,
    )
    fp32 = _model(
        [oh.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)],
        [oh.make_tensor_value_info("X", T.FLOAT, list(x.shape))],
        [oh.make_tensor_value_info("Y", T.FLOAT, None)],
        [
            numpy_helper.from_array((wf * scale[:, None]).astype(np.float32), "W"),
            numpy_helper.from_array(bias, "B"),
        ],
        adq=False,
    )
    flops = 2.0 * n * m * kin
    return _compare(name, adq, {"X": x}, fp32, {"X": x.astype(np.float32)}, flops, threads, repeat)


def _compare(name, adq, adq_feeds, fp32, fp32_feeds, flops, threads, repeat):
    so_adq = session_options(num_threads=threads)
    so_fp = ort.SessionOptions()
    so_fp.intra_op_num_threads = threads
    s_adq = ort.InferenceSession(adq, so_adq, providers=["CPUExecutionProvider"])
    s_fp = ort.InferenceSession(fp32, so_fp, providers=["CPUExecutionProvider"])
    y_adq = s_adq.run(None, adq_feeds)[0]
    y_fp = s_fp.run(None, fp32_feeds)[0]
    err = float(np.abs(y_adq - y_fp).max() / max(1.0, np.abs(y_fp).max()))
    a_best, a_med = _time(s_adq, adq_feeds, repeat)
    f_best, f_med = _time(s_fp, fp32_feeds, repeat)
    print(
        f"{name:30s} thr={threads} | adq {a_best * 1e3:8.3f} ms (med {a_med * 1e3:8.3f}) "
        f"{flops / a_best / 1e9:6.1f} GFLOP/s | fp32 {f_best * 1e3:8.3f} ms "
        f"(med {f_med * 1e3:8.3f}) {flops / f_best / 1e9:6.1f} GFLOP/s | "
        f"adq/fp32 {a_best / f_best:5.2f}x | rel.err {err:.1e}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--only", default="", help="substring of the shape names to run")
    args = ap.parse_args()
    build_library()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, bits={args.bits}")
    for threads in args.threads:
        for shape in CONV_SHAPES:
            if args.only in shape[0]:
                bench_conv(shape, args.bits, threads, args.repeat, rng)
        for shape in GEMM_SHAPES:
            if args.only in shape[0]:
                bench_gemm(shape, args.bits, threads, args.repeat, rng)


if __name__ == "__main__":
    main()
