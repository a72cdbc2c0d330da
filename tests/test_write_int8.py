"""The int8 format: snapped codebooks, integer conv on uint8 levels; the snapping is the only
difference from the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from export_helpers import (
    MODEL_CASES,
    case_input,
    initializers,
    loaded,
    onnx_model,
    run_onnx,
    snapped_model,
    torch_logits,
)
from onnx import TensorProto

from exporters.write_int8 import int_range, snap_codebook, snapped, snapping_report


@pytest.fixture(scope="module")
def snapped_models():
    return {}


def snapped_reference(name, cache):
    if name not in cache:
        ck, folded = loaded(name)
        cache[name] = snapped_model(ck, folded)
    return cache[name]


@pytest.mark.parametrize("name", MODEL_CASES)
def test_equals_the_snapped_pytorch_model(name, snapped_models):
    """ONNX int8 == PyTorch with codebooks snapped as write_int8.snapped does (same codes)."""
    model = snapped_reference(name, snapped_models)
    x = case_input(name, batch=5, seed=1, model=model)
    ref = torch_logits(model, x)
    out = run_onnx(onnx_model(name, "int8"), x)
    ratio = float(np.abs(out - ref).mean() / np.abs(ref).mean())
    assert ratio <= 1e-5, ratio
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))
    print(f"{name}: int8 vs snapped PyTorch, mean abs error / mean |logit| = {ratio:.2e}")


@pytest.mark.parametrize("name", MODEL_CASES)
def test_snapping_error_is_at_most_half_a_step(name):
    _, folded = loaded(name)
    report = snapping_report(folded)
    assert set(report) == set(folded.layers)
    for lname, row in report.items():
        layer = folded.layers[lname]
        scale, ints, err = snapped(layer)
        assert row["weight_scale"] == scale and row["max_abs_error"] == err
        assert row["qmax"] == int_range(layer.act.bits if layer.act else None)
        assert err <= scale / 2 * (1 + 1e-6), (lname, err, scale)
        assert np.abs(ints).max() <= row["qmax"]
        assert row["max_rel_error"] == pytest.approx(err / np.abs(layer.codebook).max())
        exact = np.abs(layer.codebook.astype(np.float64) - scale * ints.astype(np.float64)).max()
        assert err == pytest.approx(exact)


def test_snapping_is_reported_in_the_metadata():
    _, folded = loaded("test_model")
    props = {p.key: p.value for p in onnx_model("test_model", "int8").metadata_props}
    stored = json.loads(props["adq.snapping"])
    report = snapping_report(folded)
    assert set(stored) == set(report)
    for name, row in report.items():
        assert stored[name] == pytest.approx(row, rel=1e-12)


def test_int_range_avoids_pair_sum_saturation():
    for a_bits in range(1, 9):
        q = int_range(a_bits)
        assert 2 * (2**a_bits - 1) * q <= 32767 and q <= 127
    assert int_range(8) == 64 and int_range(4) == 127 and int_range(None) == 127


def test_snap_codebook_grid():
    book = np.array([-0.5, -0.1, 0.0, 0.07, 0.3], dtype=np.float32)
    scale, ints, err = snap_codebook(book, 7)
    assert scale == pytest.approx(0.5 / 7)
    assert ints.dtype == np.int8 and ints.tolist() == [-7, -1, 0, 1, 4]
    assert err <= scale / 2
    assert snap_codebook(np.zeros(4, np.float32), 127)[2] == 0.0


@pytest.mark.parametrize("name", MODEL_CASES)
def test_integer_weights_and_ops(name):
    _, folded = loaded(name)
    model = onnx_model(name, "int8")
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    inits = initializers(model)
    ops = [n.op_type for n in model.graph.node]
    for lname, layer in folded.layers.items():
        _, ints, _ = snapped(layer)
        transposed = layer.act is not None and layer.kind == "gemm"
        t = inits[f"{lname}.weight_int8_t" if transposed else f"{lname}.weight_int8"]
        assert t.data_type == TensorProto.INT8
        w = onnx.numpy_helper.to_array(t)
        np.testing.assert_array_equal(w.T if transposed else w, ints[layer.codes])
    with_act = [lay for lay in folded.layers.values() if lay.act is not None]
    conv_int = sum(lay.kind == "conv" for lay in with_act)
    assert ops.count("ConvInteger") == conv_int
    assert ops.count("MatMulInteger") == len(with_act) - conv_int


@pytest.mark.parametrize("name", ["test_model", "resnet20"])
def test_dynamic_batch(name, snapped_models):
    model = onnx_model(name, "int8")
    reference = snapped_reference(name, snapped_models)
    x = case_input(name, batch=5, seed=2, model=reference)
    out5 = run_onnx(model, x)
    out1 = run_onnx(model, x[:1])
    assert out5.shape[0] == 5 and out1.shape == (1, out5.shape[1])
    np.testing.assert_allclose(out1[0], out5[0], rtol=1e-5, atol=1e-6)
    ref = torch_logits(reference, x[:1])
    assert np.abs(out1 - ref).mean() <= 1e-5 * np.abs(ref).mean()
