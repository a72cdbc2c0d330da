"""Shared models, checkpoints and runners of the exporter tests (test_fold ... test_export).

Every test model is made "trained-like" before it is saved: a few SGD steps on random data in
train mode move the batch-norm statistics, the N2UQ / LSQ parameters and the codebooks away
from their initial values (at init, N2UQ levels are degenerate and BN folding is a no-op).

Checkpoints are built once per test session (cached here, in a temporary folder removed at
exit) and shared by the test files; tests must not modify what these helpers return.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from adq_deploy import models
from adq_deploy.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from adq_deploy.models.registry import unregister
from adq_deploy.quant import QuantConfig, QuantLayerMixin, quantize_model
from exporters.export import build_model, simplify
from exporters.fold import FoldedModel, fold, placeholder_name
from exporters.graph import compact_names
from exporters.skeleton import DOMAIN, PLACEHOLDER
from exporters.write_int8 import snapped, snapped_model  # noqa: F401 - tests use both
from runtime.library import installed_onnxruntime, oldest_onnxruntime
from runtime.reference import run_reference

ROOT = Path(__file__).resolve().parents[1]
TEST_MODEL = "adq_export_test_net"  # registry name, registered only while it is needed


# ------------------------------------------------------------------------------------------
# The test model: every layer kind the exporter has to handle.


class ExportTestNet(nn.Module):
    """Depthwise, pointwise (with bias), grouped + strided, dilated + residual, a float conv,
    a conv whose output has two consumers (its BN cannot be folded), a conv with bias and
    no BN, max and average pooling, a Linear hidden layer with BatchNorm1d and a Linear head.

    Input [C, 16, 16]; module registration order puts `stem` first and `head` last.
    """

    def __init__(self, num_classes: int = 5, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(w)
        self.dw = nn.Conv2d(w, w, 3, 1, 1, groups=w, bias=False)  # depthwise
        self.bn_dw = nn.BatchNorm2d(w)
        self.pw = nn.Conv2d(w, 2 * w, 1, bias=True)  # pointwise, bias and BN
        self.bn_pw = nn.BatchNorm2d(2 * w)
        self.grouped = nn.Conv2d(2 * w, 2 * w, 3, 2, 1, groups=4, bias=False)  # 16 -> 8
        self.bn_grouped = nn.BatchNorm2d(2 * w)
        self.dilated = nn.Conv2d(2 * w, 2 * w, 3, 1, 2, dilation=2, bias=False)
        self.bn_dilated = nn.BatchNorm2d(2 * w)
        self.maxpool = nn.MaxPool2d(2)  # 8 -> 4
        self.float_conv = nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=True)  # QuantConfig(skip=...)
        self.bn_float = nn.BatchNorm2d(2 * w)
        self.shared = nn.Conv2d(2 * w, 2 * w, 1, bias=False)  # output read twice: no folding
        self.bn_shared = nn.BatchNorm2d(2 * w)
        self.plain = nn.Conv2d(2 * w, 4 * w, (3, 1), (2, 1), (1, 0), bias=True)  # 4x4 -> 2x4
        self.avgpool = nn.AvgPool2d(2)  # 2x4 -> 1x2
        self.flatten = nn.Flatten(1)
        self.hidden = nn.Linear(8 * w, 4 * w)
        self.bn_hidden = nn.BatchNorm1d(4 * w)
        self.head = nn.Linear(4 * w, num_classes)
        for m in self.modules():  # He init: the default init shrinks activations layer by layer
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_stem(self.stem(x)))
        x = torch.relu(self.bn_dw(self.dw(x)))
        x = torch.relu(self.bn_pw(self.pw(x)))
        x = torch.relu(self.bn_grouped(self.grouped(x)))
        x = torch.relu(self.bn_dilated(self.dilated(x)) + x)  # residual add
        x = self.maxpool(x)
        x = torch.relu(self.bn_float(self.float_conv(x)))
        t = self.shared(x)
        x = torch.relu(self.bn_shared(t) + t)
        x = torch.relu(self.plain(x))
        x = self.flatten(self.avgpool(x))
        x = torch.relu(self.bn_hidden(self.hidden(x)))
        return self.head(x)


def make_test_model(num_classes: int = 5, in_channels: int = 3, width: int = 8) -> ExportTestNet:
    """Factory of the test model (also usable as 'tests.export_helpers:make_test_model')."""
    return ExportTestNet(num_classes, in_channels, width)


# Quantized layers of the test model that a BatchNormalization follows (and only that).
TEST_MODEL_BN_FOLDED = ("dw", "pw", "grouped", "dilated", "hidden")
TEST_MODEL_NOT_FOLDED = ("shared", "plain")  # shared: two consumers; plain: no BN at all


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block: on a busy 2-core machine, OpenMP spinning makes the
    small ops of these models 10-100x slower with two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """The test model in the model registry for the duration of the block (re-entrant)."""
    if TEST_MODEL in models.available():
        yield TEST_MODEL
        return
    models.register(TEST_MODEL, make_test_model)
    try:
        yield TEST_MODEL
    finally:
        unregister(TEST_MODEL)


# ------------------------------------------------------------------------------------------
# Cases: model, input, quantization; checkpoints built once per session.


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    config: QuantConfig
    steps: int = 3
    batch: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


# resnet20 body layers: layer1 4 bits, layer2 3 bits, layer3 4/3/2 bits: 2.845 parameter-
# weighted average bits (every bit width the writers pack differently).
R20_BITS = {
    **{f"layer1.{b}.conv{c}": 4 for b in range(3) for c in (1, 2)},
    **{f"layer2.{b}.conv{c}": 3 for b in range(3) for c in (1, 2)},
    "layer3.0.conv1": 4,
    "layer3.0.conv2": 3,
    "layer3.1.conv1": 3,
    "layer3.1.conv2": 3,
    "layer3.2.conv1": 2,
    "layer3.2.conv2": 2,
}
R20_A_BITS = {"layer1.0.conv1": 2, "layer2.0.conv1": 4, "layer3.2.conv2": 2}

CASES = {
    "resnet20": Case(
        "resnet20",
        "resnet20",
        {"num_classes": 10, "in_channels": 1},
        (1, 28, 28),
        QuantConfig(w_bits=3, a_bits=3, layer_bits=R20_BITS, layer_a_bits=R20_A_BITS),
    ),
    # W8 first layer with a float input, W8A8 last layer, symmetric (2^b - 1 level) codebooks.
    "small_cnn": Case(
        "small_cnn",
        "small_cnn",
        {"num_classes": 10, "in_channels": 1, "width": 8},
        (1, 28, 28),
        QuantConfig(w_bits=2, a_bits=4, w_form="symmetric", edge_bits=8),
    ),
    # LSQ activations keep the training steps of an 11M-parameter model cheap; W8A8 edges with
    # the network input quantized too (input_bits): an integer first layer.
    "resnet18": Case(
        "resnet18",
        "resnet18",
        {"num_classes": 7, "in_channels": 3},
        (3, 32, 32),
        QuantConfig(
            w_bits=2,
            a_bits=3,
            act="lsq",
            layer_bits={"layer4.1.conv2": 3},
            edge_bits=8,
            input_bits=8,
        ),
        steps=2,
        batch=4,
    ),
    "test_model": Case(
        "test_model",
        TEST_MODEL,
        {"num_classes": 5, "in_channels": 3, "width": 8},
        (3, 16, 16),
        QuantConfig(
            w_bits=3,
            a_bits=3,
            skip=("float_conv",),
            layer_bits={"dw": 2, "pw": 4, "grouped": 3, "dilated": 2, "shared": 4, "plain": 3},
            layer_a_bits={"dw": 4, "pw": 2, "dilated": 4, "hidden": 2},
        ),
    ),
}
MODEL_CASES = tuple(CASES)

_TMP = Path(tempfile.mkdtemp(prefix="adq-export-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def tmp_dir() -> Path:
    """The session's scratch folder (removed at exit)."""
    return _TMP


def trained_like(
    model: nn.Module, input_shape: tuple[int, ...], steps: int = 3, batch: int = 8
) -> nn.Module:
    """A few SGD steps on random data in train mode (BN statistics, quantizers, codebooks
    move), then eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    model.train()
    for i in range(steps):
        gen = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(batch, *input_shape, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def quantized_model(case: Case, seed: int = 0) -> nn.Module:
    """The case's model, quantized and trained-like (not saved)."""
    torch.manual_seed(seed)
    with registered():
        model = models.get(case.model, **case.kwargs)
    quantize_model(model, case.config)
    return trained_like(model, case.input_shape, case.steps, case.batch)


def meta(case: Case) -> dict[str, Any]:
    """save_checkpoint metadata of a case."""
    channels = case.input_shape[0]
    classes = case.kwargs.get("num_classes", 10)
    return {
        "input_shape": list(case.input_shape),
        "mean": [0.25 + 0.1 * i for i in range(channels)],
        "std": [0.5 + 0.05 * i for i in range(channels)],
        "class_names": [f"class_{i}" for i in range(classes)],
    }


@functools.cache
@one_thread()
def checkpoint_path(name: str) -> Path:
    """A saved checkpoint of a case (built once per session)."""
    case = CASES[name]
    path = _TMP / f"{name}.pt"
    save_checkpoint(quantized_model(case), path, **meta(case))
    return path


@functools.cache
@one_thread()
def loaded(name: str) -> tuple[Checkpoint, FoldedModel]:
    """The case's checkpoint loaded back (model in eval mode) and its folded form."""
    with registered():
        ck = load_checkpoint(checkpoint_path(name))
    return ck, fold(ck)


@functools.cache
def onnx_model(
    name: str, fmt: str, opset: int | None = None, int_codebooks: bool = False, nchw: bool = False
) -> onnx.ModelProto:
    """What export() builds for a case (simplified for standard and int8), not written."""
    _, folded = loaded(name)
    model = build_model(folded, fmt, opset, int_codebooks, nchw)
    if fmt != "adq":
        model = simplify(model)
        compact_names(model)
    return model


# ------------------------------------------------------------------------------------------
# Inputs, runners, comparisons.


def random_input(shape: tuple[int, ...], batch: int = 5, seed: int = 0) -> np.ndarray:
    """Normal random images (what a normalized input looks like)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen).numpy()


def tie_margin(model: nn.Module, folded: FoldedModel, x: np.ndarray) -> np.ndarray:
    """Per sample: the smallest distance of any quantized activation to its nearest threshold,
    min |scale * x - T_i|, in units of the layer's threshold spacing (scaled domain).

    A value within float rounding of a threshold may get a different level in PyTorch and in
    an ONNX runtime (the folded batch norm, the accumulation order and FMA round differently,
    by ~1e-6 of the spacing), and with 2-4-bit activations one flipped level early in a network
    can move the logits by percents. That is inherent in any re-implementation, not an export
    error, so the tests compare on inputs that keep clear of the thresholds.
    """
    margins = np.full(len(x), np.inf)
    hooks = []

    def hook(name: str):
        act = folded.layers[name].act
        t = act.thresholds.astype(np.float64)
        spacing = float(np.diff(t).mean()) if t.size > 1 else max(abs(float(t[0])), 1.0)

        def fn(module, inputs, output):
            v = (np.float32(act.scale) * inputs[0].detach().numpy()).astype(np.float64)
            v = v.reshape(len(x), -1)
            idx = np.clip(np.searchsorted(t, v), 1, t.size - 1) if t.size > 1 else 0
            lo = np.abs(v - t[idx - 1]) if t.size > 1 else np.abs(v - t[0])
            hi = np.abs(v - t[idx]) if t.size > 1 else lo
            d = np.minimum(lo, hi).min(1) / spacing
            np.minimum(margins, d, out=margins)

        return fn

    for name, layer in quant_layers(model).items():
        act = folded.layers[name].act
        # a quantized network input is one float32 product and compares everywhere: no ties
        if act is not None and act.kind != "input":
            hooks.append(layer.register_forward_hook(hook(name)))
    try:
        torch_logits(model, x)
    finally:
        for h in hooks:
            h.remove()
    return margins


def safe_input(
    model: nn.Module,
    folded: FoldedModel,
    shape: tuple[int, ...],
    batch: int = 5,
    seed: int = 0,
    candidates: int = 8,
) -> np.ndarray:
    """`batch` random images, the ones farthest from a threshold tie among `candidates` x
    `batch` draws (see tie_margin); still random, just not on a rounding knife-edge."""
    pool = random_input(shape, batch=batch * candidates, seed=seed)
    margins = tie_margin(model, folded, pool)
    keep = np.sort(np.argsort(-margins, kind="stable")[:batch])
    return pool[keep]


def case_input(
    name: str, batch: int = 5, seed: int = 0, model: nn.Module | None = None
) -> np.ndarray:
    """safe_input for a case, for its checkpoint's model (or `model`, e.g. the snapped one)."""
    ck, folded = loaded(name)
    return safe_input(model or ck.model, folded, CASES[name].input_shape, batch, seed)


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad(), one_thread():
        return model.eval()(torch.from_numpy(x)).numpy()


def uses_adq_domain(model: onnx.ModelProto) -> bool:
    return any(o.domain == DOMAIN for o in model.opset_import)


def run_onnx(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    """Logits of an exported model: ai.adq graphs through the NumPy reference, the other
    formats through onnxruntime."""
    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    if uses_adq_domain(proto):
        return run_reference(proto, {"input": x})[0]
    return ort_session(proto).run(None, {"input": x})[0]


def skip_if_onnxruntime_too_old(model: onnx.ModelProto | str | Path) -> None:
    """pytest.skip when the installed onnxruntime is older than the export needs."""
    import pytest

    proto = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    need = oldest_onnxruntime(proto)  # docs/export.md's table; CI's `make test-oldest` runs 1.21
    if installed_onnxruntime() < need:
        pytest.skip(
            f"needs onnxruntime >= {need[0]}.{need[1]} (docs/export.md), "
            f"installed {ort.__version__}"
        )


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    skip_if_onnxruntime_too_old(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def assert_logits_match(out: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> float:
    """Mean |out - ref| <= rel * mean |ref| and the same top-1 class; returns the ratio."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all()
    ratio = float(np.abs(out - ref).mean() / np.abs(ref).mean())
    assert ratio <= rel, f"mean abs error {ratio:.3g} x mean |logit| > {rel:g}"
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    return ratio


# ------------------------------------------------------------------------------------------
# Graph inspection.


def placeholders(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Placeholder nodes of a skeleton by layer name."""
    return {
        placeholder_name(n): n
        for n in model.graph.node
        if n.op_type == PLACEHOLDER and n.domain == DOMAIN
    }


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def quant_layers(model: nn.Module) -> dict[str, QuantLayerMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)}


# ------------------------------------------------------------------------------------------
# Running a skeleton: the placeholders computed by the PyTorch layers themselves.


def placeholder_op(model: nn.Module, folded: FoldedModel | None = None) -> type:
    """An onnx.reference op for `ai.adq::QuantLayer` that runs the PyTorch layer.

    With `folded`, the op applies the folded affine instead of the layer's own bias:
    y = out_scale * (layer(x) - bias) + out_bias, i.e. what the writers implement.
    """
    from onnx.reference.op_run import OpRun

    layers = quant_layers(model)

    def run(x: np.ndarray, name: str) -> np.ndarray:
        layer = layers[name]
        with torch.no_grad(), one_thread():
            y = layer(torch.from_numpy(x)).double()
            if folded is None:
                return y.float().numpy()
            f = folded.layers[name]
            shape = (1, -1) + (1,) * (y.dim() - 2)
            if layer.bias is not None:
                y = y - layer.bias.double().reshape(shape)
            scale = torch.from_numpy(f.out_scale).double().reshape(shape)
            bias = torch.from_numpy(f.out_bias).double().reshape(shape)
            return (y * scale + bias).float().numpy()

    class QuantLayer(OpRun):
        op_domain = DOMAIN

        def _run(self, x, name=None):  # noqa: ANN001
            return (run(x, name.decode() if isinstance(name, bytes) else name),)

    return QuantLayer


def run_skeleton(
    skeleton: onnx.ModelProto, model: nn.Module, x: np.ndarray, folded: FoldedModel | None = None
) -> np.ndarray:
    """Logits of a skeleton graph whose placeholders run the PyTorch layers."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(skeleton, new_ops=[placeholder_op(model, folded)])
    return ev.run(None, {"input": x})[0]
