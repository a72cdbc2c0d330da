"""Kernel rates (not a test): each ai.adq kernel against the machine's fp32 and int8 GEMM rates.

First the machine: the best of onnxruntime's MatMul (MLAS SGEMM) and torch.matmul on fp32
[1024 x 1024] x [1024 x 1024], and onnxruntime's MatMulInteger (MLAS u8 x s8 GEMM, VNNI where
the CPU has it) on the same shape in uint8 / int8. Then, per layer shape, LutConv's float path
(a float codebook), its int8 path (an integer codebook; NCHW and channels last), LutGemm, and
onnxruntime's fp32 Conv / Gemm on the same weights (for ConvPoolQuant and LutConvPoolQuant, the
unfused float graph they replace): GMAC/s (multiply-adds per second, best of
`--repeat`) and the share of the machine's fp32 and int8 GEMM rates. The LutConv graph holds
packed codes, a codebook, Scale and Bias as initializers and takes uint8 levels; the baseline
holds the decoded fp32 weights and takes the same levels as float.

    .venv/bin/python benchmarks/kernel_rates.py --threads 1 2 --repeat 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import torch
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
    ("resnet18 64ch 56x56 batch 8", 8, 64, 56, 56, 64, 3, 1, 1),
    ("resnet18 512ch 7x7 batch 8", 8, 512, 7, 7, 512, 3, 1, 1),
    ("pointwise 1x1 128->256 28x28", 1, 128, 28, 28, 256, 1, 1, 1),
    ("depthwise 3x3 128ch 28x28", 1, 128, 28, 28, 128, 3, 1, 128),
]
# name, N (ResNet-18's first layer: 3 -> 64 channels, 7x7 / 2, ReLU, 3x3 / 2 max pooling)
STEM_SHAPES = [("resnet18 stem 224x224", 1), ("resnet18 stem 224x224 batch 8", 8)]
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
    return _time_fn(lambda: sess.run(None, feeds), repeat)


def _time_fn(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times))


def _lut_inits(codes, codebook, scale, bias, bits):
    arrays = {"codes": pack_rows(codes, bits), "cb": codebook, "s": scale, "b": bias}
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def _weights(rng, bits, m, r, integer=False):
    k = 1 << bits
    codes = rng.integers(0, k, size=(m, r))
    if integer:  # LutConv's exact int8 path
        codebook = np.sort(rng.choice(np.arange(-127, 128), size=k, replace=False))
        return codes, codebook.astype(np.float32)
    codebook = np.sort(rng.normal(size=k)).astype(np.float32)
    return codes, codebook


def machine_rates(threads, repeat):
    """GMAC/s of fp32 GEMM (best of onnxruntime and torch) and of onnxruntime's int8 GEMM."""
    n = 1024
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, n)).astype(np.float32)
    b = rng.normal(size=(n, n)).astype(np.float32)
    T = onnx.TensorProto
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads

    def session(node, xtype, btype, bvalue):
        model = _model(
            [node],
            [oh.make_tensor_value_info("A", xtype, [n, n])],
            [oh.make_tensor_value_info("Y", T.FLOAT if xtype == T.FLOAT else T.INT32, None)],
            [numpy_helper.from_array(bvalue, "B")],
            adq=False,
        )
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    s_f = session(oh.make_node("MatMul", ["A", "B"], ["Y"]), T.FLOAT, T.FLOAT, b)
    ort_f, _ = _time(s_f, {"A": a}, repeat)
    torch.set_num_threads(threads)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_f, _ = _time_fn(lambda: torch.matmul(ta, tb), repeat)
    au8 = rng.integers(0, 256, size=(n, n), dtype=np.uint8)
    bs8 = rng.integers(-128, 128, size=(n, n), dtype=np.int8)
    s_i = session(oh.make_node("MatMulInteger", ["A", "B"], ["Y"]), T.UINT8, T.INT8, bs8)
    ort_i, _ = _time(s_i, {"A": au8}, repeat)
    macs = float(n) ** 3
    rates = {
        "fp32_onnxruntime": macs / ort_f / 1e9,
        "fp32_torch": macs / torch_f / 1e9,
        "int8_onnxruntime": macs / ort_i / 1e9,
    }
    rates["fp32"] = max(rates["fp32_onnxruntime"], rates["fp32_torch"])
    rates["int8"] = rates["int8_onnxruntime"]
    return rates


def bench_conv(shape, bits, threads, repeat, rng, rates, integer=False, nhwc=False):
    name, n, c, h, w, m, k, s, g = shape
    pad = k // 2
    r = (c // g) * k * k
    codes, codebook = _weights(rng, bits, m, r, integer)
    wf = codebook[codes].reshape(m, c // g, k, k)
    scale = rng.uniform(0.5, 1.5, size=m).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    x = rng.integers(0, 16, size=(n, c, h, w), dtype=np.uint8)
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4, group=g)
    T = onnx.TensorProto
    xa = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if nhwc else x
    adq = _model(
        [
            oh.make_node(
                "LutConv",
                LUT_INPUTS,
                ["Y"],
                domain=DOMAIN,
                bits=bits,
                channels_last=int(nhwc),
                **attrs,
            )
        ],
        [oh.make_tensor_value_info("X", T.UINT8, list(xa.shape))],
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
    macs = float(n) * m * oh_ * oh_ * r
    label = f"LutConv {'int8' if integer else 'float'}{' NHWC' if nhwc else ''}: {name}"
    return _compare(
        label, adq, {"X": xa}, fp32, {"X": x.astype(np.float32)}, macs, threads, repeat, rates, nhwc
    )


def bench_gemm(shape, bits, threads, repeat, rng, rates):
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
    macs = float(n) * m * kin
    label = f"LutGemm: {name}"
    return _compare(
        label, adq, {"X": x}, fp32, {"X": x.astype(np.float32)}, macs, threads, repeat, rates
    )


STEM_CONV = dict(kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3])
STEM_POOL = dict(pool_kernel_shape=[3, 3], pool_strides=[2, 2], pool_pads=[1, 1, 1, 1])
STEM_QUANT = [
    numpy_helper.from_array(np.array([1.0], np.float32), "s"),
    numpy_helper.from_array(np.array([0.3, 0.9, 1.5], np.float32), "t"),
]


def _stem_io(x_type, n):
    T = onnx.TensorProto
    outputs = [
        oh.make_tensor_value_info("Y", T.FLOAT, None),
        oh.make_tensor_value_info("Q", T.UINT8, None),
    ]
    return [oh.make_tensor_value_info("X", x_type, [n, 3, 224, 224])], outputs


def _unfused_stem(w, bias, n):
    """The graph a fused stem replaces, on a float X: onnxruntime's fp32 Conv (weights w, bias),
    Relu, MaxPool and Transpose to NHWC, then ThresholdQuant (the op library's)."""
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B"), *STEM_QUANT]
    nodes = [
        oh.make_node("Conv", ["X", "W", "B"], ["z"], **STEM_CONV),
        oh.make_node("Relu", ["z"], ["r"]),
        oh.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4),
        oh.make_node("Transpose", ["p"], ["Y"], perm=[0, 2, 3, 1]),
        oh.make_node("ThresholdQuant", ["Y", "s", "t"], ["Q"], domain=DOMAIN),
    ]
    return _model(nodes, *_stem_io(onnx.TensorProto.FLOAT, n), inits, adq=True)


def bench_conv_pool(shape, threads, repeat, rng, rates):
    """ConvPoolQuant against the graph it replaces (_unfused_stem); Y compared."""
    name, n = shape
    x = rng.normal(size=(n, 3, 224, 224)).astype(np.float32)
    w = (rng.normal(size=(64, 3, 7, 7)) * 0.1).astype(np.float32)
    bias = rng.normal(size=64).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B"), *STEM_QUANT]
    node = oh.make_node(
        "ConvPoolQuant", ["X", "W", "B", "s", "t"], ["Y", "Q"], domain=DOMAIN, relu=1,
        **STEM_CONV, **STEM_POOL,
    )  # fmt: skip
    fused = _model([node], *_stem_io(onnx.TensorProto.FLOAT, n), inits, adq=True)
    macs = float(n) * 64 * 112 * 112 * 3 * 49
    feeds = {"X": x}
    _compare(
        f"ConvPoolQuant: {name}", fused, feeds, _unfused_stem(w, bias, n), feeds, macs, threads,
        repeat, rates, baseline_adq=True,
    )  # fmt: skip


def bench_lut_conv_pool(shape, threads, repeat, rng, rates):
    """LutConvPoolQuant (uint8 levels, zero point 128, 8-bit codes of integer levels in
    -64..64: its int8 path) against the float graph on the same numbers (_unfused_stem on
    level - 128 and the decoded weights times Scale); Y compared."""
    name, n = shape
    x = rng.integers(0, 256, size=(n, 3, 224, 224)).astype(np.uint8)
    book = np.arange(-64, 65, dtype=np.float32)
    codes = rng.integers(0, book.size, size=(64, 3 * 49))
    scale = rng.uniform(0.5e-3, 1.5e-3, 64).astype(np.float32)
    bias = rng.normal(size=64).astype(np.float32)
    inits = [
        numpy_helper.from_array(pack_rows(codes, 8), "codes"),
        numpy_helper.from_array(book, "cb"),
        numpy_helper.from_array(scale, "Scale"),
        numpy_helper.from_array(bias, "B"),
        *STEM_QUANT,
    ]
    node = oh.make_node(
        "LutConvPoolQuant", ["X", "codes", "cb", "Scale", "B", "s", "t"], ["Y", "Q"],
        domain=DOMAIN, bits=8, x_zero_point=128, relu=1, **STEM_CONV, **STEM_POOL,
    )  # fmt: skip
    fused = _model([node], *_stem_io(onnx.TensorProto.UINT8, n), inits, adq=True)
    w = (book[codes] * scale[:, None]).reshape(64, 3, 7, 7).astype(np.float32)
    macs = float(n) * 64 * 112 * 112 * 3 * 49
    _compare(
        f"LutConvPoolQuant int8: {name}", fused, {"X": x}, _unfused_stem(w, bias, n),
        {"X": x.astype(np.float32) - 128}, macs, threads, repeat, rates, baseline_adq=True,
    )  # fmt: skip


def _compare(
    name,
    adq,
    adq_feeds,
    fp32,
    fp32_feeds,
    macs,
    threads,
    repeat,
    rates,
    nhwc=False,
    baseline_adq=False,
):
    so_adq = session_options(num_threads=threads)
    so_fp = session_options(num_threads=threads) if baseline_adq else ort.SessionOptions()
    so_fp.intra_op_num_threads = threads
    s_adq = ort.InferenceSession(adq, so_adq, providers=["CPUExecutionProvider"])
    s_fp = ort.InferenceSession(fp32, so_fp, providers=["CPUExecutionProvider"])
    y_adq = s_adq.run(None, adq_feeds)[0]
    if nhwc:  # compared in NCHW
        y_adq = y_adq.transpose(0, 3, 1, 2)
    y_fp = s_fp.run(None, fp32_feeds)[0]
    err = float(np.abs(y_adq - y_fp).max() / max(1.0, np.abs(y_fp).max()))
    a_best, _ = _time(s_adq, adq_feeds, repeat)
    f_best, _ = _time(s_fp, fp32_feeds, repeat)
    a_rate, f_rate = macs / a_best / 1e9, macs / f_best / 1e9
    print(
        f"| {name} | {threads} | {a_best * 1e3:.3f} | {a_rate:.0f} | "
        f"{100 * a_rate / rates['fp32']:.0f}% | {100 * a_rate / rates['int8']:.0f}% | "
        f"{f_best * 1e3:.3f} | {f_rate:.0f} | {a_best / f_best:.2f}x | {err:.0e} |",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--only", default="", help="substring of the shape names to run")
    args = ap.parse_args()
    build_library()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, weight bits {args.bits}")
    for threads in args.threads:
        rates = machine_rates(threads, args.repeat)
        print(
            f"\nthreads={threads}: machine fp32 GEMM {rates['fp32']:.0f} GMAC/s (onnxruntime "
            f"{rates['fp32_onnxruntime']:.0f}, torch {rates['fp32_torch']:.0f}); int8 GEMM "
            f"(onnxruntime MatMulInteger) {rates['int8']:.0f} GMAC/s\n"
        )
        print(
            "| kernel: shape | threads | ms | GMAC/s | of fp32 GEMM | of int8 GEMM | "
            "onnxruntime fp32 ms | its GMAC/s | ours / onnxruntime | rel. err |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for shape in CONV_SHAPES:
            if args.only in shape[0]:
                bench_conv(shape, args.bits, threads, args.repeat, rng, rates)
                if shape[8] == 1:
                    bench_conv(shape, args.bits, threads, args.repeat, rng, rates, integer=True)
                    bench_conv(
                        shape, args.bits, threads, args.repeat, rng, rates, integer=True, nhwc=True
                    )
        for shape in STEM_SHAPES:
            if args.only in shape[0]:
                bench_conv_pool(shape, threads, args.repeat, rng, rates)
                bench_lut_conv_pool(shape, threads, args.repeat, rng, rates)
        for shape in GEMM_SHAPES:
            if args.only in shape[0]:
                bench_gemm(shape, args.bits, threads, args.repeat, rng, rates)


if __name__ == "__main__":
    main()
