"""The adq format: ai.adq ops, row-packed codes; run through the NumPy reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnx
import pytest
from export_helpers import (
    MODEL_CASES,
    assert_logits_match,
    case_input,
    initializers,
    loaded,
    onnx_model,
    run_onnx,
    snapped_model,
    torch_logits,
)
from onnx import TensorProto

from exporters import graph as graph_module
from exporters import write_adq as write_adq_module
from exporters.export import build_model
from exporters.graph import Fusions, fuse_lut_conv, known_shapes
from exporters.write_adq import write_adq
from runtime.packing import pack_rows, unpack_rows
from runtime.schema import DOMAIN, register_onnx_schemas
from runtime.validate import snapping_ranges

ADQ_OPS = {"ThresholdQuant", "LutConv", "LutConvQuant", "LutGemm", "LutDequant"}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_matches_the_pytorch_model(name):
    """Mean |logit error| <= 1e-4 mean |logit| and the same top-1, on random inputs."""
    ck, _ = loaded(name)
    x = case_input(name, batch=5, seed=1)
    ratio = assert_logits_match(run_onnx(onnx_model(name, "adq"), x), torch_logits(ck.model, x))
    print(f"{name}: mean abs error / mean |logit| = {ratio:.2e}")


@pytest.mark.parametrize("name", ["test_model", "resnet20"])
def test_dynamic_batch(name):
    """Batch 1 and batch 5 through the same model."""
    ck, _ = loaded(name)
    model = onnx_model(name, "adq")
    x = case_input(name, batch=5, seed=2)
    out5 = run_onnx(model, x)
    out1 = run_onnx(model, x[:1])
    assert out1.shape == (1, out5.shape[1]) and out5.shape[0] == 5
    np.testing.assert_allclose(out1[0], out5[0], rtol=1e-5, atol=1e-6)
    assert_logits_match(out1, torch_logits(ck.model, x[:1]))


@pytest.mark.parametrize("name", MODEL_CASES)
def test_codes_are_packed_rows(name):
    """Codes: uint8 [M, ceil(R * bits / 8)] equal to runtime.packing.pack_rows."""
    _, folded = loaded(name)
    inits = initializers(onnx_model(name, "adq"))
    for lname, layer in folded.layers.items():
        t = inits[f"{lname}.codes"]
        assert t.data_type == TensorProto.UINT8
        m = layer.codes.shape[0]
        r = layer.codes.size // m
        assert list(t.dims) == [m, math.ceil(r * layer.bits / 8)]
        packed = onnx.numpy_helper.to_array(t)
        np.testing.assert_array_equal(packed, pack_rows(layer.codes, layer.bits))
        np.testing.assert_array_equal(unpack_rows(packed, layer.bits, r), layer.codes.reshape(m, r))
        book = onnx.numpy_helper.to_array(inits[f"{lname}.codebook"])
        np.testing.assert_array_equal(book, layer.codebook)


def test_three_bit_codes_are_not_padded():
    _, folded = loaded("resnet20")
    inits = initializers(onnx_model("resnet20", "adq"))
    three = [n for n, lay in folded.layers.items() if lay.bits == 3]
    assert three
    for name in three:
        r = folded.layers[name].codes[0].size
        cols = inits[f"{name}.codes"].dims[1]
        assert cols == math.ceil(r * 3 / 8) < math.ceil(r * 4 / 8)


@pytest.mark.parametrize("name", MODEL_CASES)
def test_graph_uses_the_adq_op_set(name):
    model = onnx_model(name, "adq")
    _, folded = loaded(name)
    register_onnx_schemas()
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import} == {"": 20, DOMAIN: 1}
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in custom} <= ADQ_OPS
    assert all(n.domain in ("", DOMAIN) for n in model.graph.node)
    assert not [n for n in model.graph.node if n.op_type == "QuantLayer"]
    # one LutConv / LutConvQuant / LutGemm per layer with a quantized input, LutDequant for the
    # others; one ThresholdQuant per quantized input, unless fused into the LutConvQuant before
    # (output Q, and Q2 for a second quantizer) or into the LutConv (output Q)
    # (a quantized network input is a ThresholdQuant, then DequantizeLinear and the float form)
    inputs = sum(lay.act is not None and lay.act.kind == "input" for lay in folded.layers.values())
    with_act = sum(lay.act is not None for lay in folded.layers.values()) - inputs
    lut = [n for n in custom if n.op_type in ("LutConv", "LutConvQuant", "LutGemm")]
    assert len(lut) == with_act
    fused = sum(
        len(n.output) if n.op_type == "LutConvQuant" else 1
        for n in custom
        if n.op_type == "LutConvQuant" or len(n.output) == 2
    )
    assert len([n for n in custom if n.op_type == "ThresholdQuant"]) == with_act - fused + inputs
    assert len([n for n in model.graph.node if n.op_type == "DequantizeLinear"]) == inputs
    assert len([n for n in custom if n.op_type == "LutDequant"]) == len(folded.layers) - with_act
    # no Relu is left whose only readers are ThresholdQuant nodes (they are dropped)
    for relu in (n for n in model.graph.node if n.op_type == "Relu"):
        readers = [n for n in model.graph.node if relu.output[0] in n.input]
        assert any(n.op_type != "ThresholdQuant" for n in readers) or not readers


def test_float_input_layer_uses_lut_dequant():
    """small_cnn's W8 first layer reads the float image: LutDequant + Conv."""
    _, folded = loaded("small_cnn")
    first = folded.layers["features.0.0"]
    assert first.act is None and first.bits == 8
    model = onnx_model("small_cnn", "adq")
    (deq,) = [n for n in model.graph.node if n.op_type == "LutDequant"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in deq.attribute}
    assert attrs == {"bits": 8, "shape": list(first.codes.shape)}
    assert deq.input[0] == "features.0.0.codes"


def test_writer_does_not_change_the_folded_model():
    _, folded = loaded("test_model")
    before = folded.skeleton.SerializeToString()
    scales = {n: lay.out_scale.copy() for n, lay in folded.layers.items()}
    write_adq(folded)
    assert folded.skeleton.SerializeToString() == before
    for n, lay in folded.layers.items():
        np.testing.assert_array_equal(lay.out_scale, scales[n])


@pytest.mark.parametrize("name", MODEL_CASES)
def test_int_codebooks_equal_the_snapped_pytorch_model(name):
    """--int-codebooks: integer codebooks (s_w in the scale) == PyTorch with the codebooks
    snapped onto s_w * {-127..127} (every layer: the op library never saturates; the int8
    format narrows 8-bit-input layers to 64), as the metadata says; same codes as the plain adq
    export."""
    ck, folded = loaded(name)
    model = onnx_model(name, "adq", int_codebooks=True)
    meta = {p.key: p.value for p in model.metadata_props}
    qmax = snapping_ranges(meta["adq.snapping"], name)
    assert set(qmax.values()) == {127} and set(qmax) == set(folded.layers)
    snapped = snapped_model(ck, folded, qmax)
    x = case_input(name, batch=5, seed=1, model=snapped)
    ratio = assert_logits_match(run_onnx(model, x), torch_logits(snapped, x), rel=1e-5)
    inits, plain = initializers(model), initializers(onnx_model(name, "adq"))
    for lname in folded.layers:
        book = onnx.numpy_helper.to_array(inits[f"{lname}.codebook"])
        assert np.array_equal(book, np.round(book)) and np.abs(book).max() <= 127
        assert inits[f"{lname}.codes"] == plain[f"{lname}.codes"]
    assert meta["adq.int_codebooks"] == "true"
    print(f"{name}: int codebooks vs snapped PyTorch, mean abs error / mean |logit| = {ratio:.2e}")


def test_int_codebooks_only_for_adq():
    _, folded = loaded("test_model")
    with pytest.raises(ValueError, match="adq format only"):
        build_model(folded, "standard", None, int_codebooks=True)


def unfused_model(name, monkeypatch, int_codebooks=False):
    """write_adq without the LutConv fusion pass."""
    _, folded = loaded(name)
    with monkeypatch.context() as m:
        m.setattr(write_adq_module, "fuse_lut_conv", lambda model, domain: None)
        return write_adq(folded, int_codebooks)


# What the fusion pass folds (residual Adds, Relus, ThresholdQuants into LutConvQuant, and into
# LutConv's levels output Q), from the architectures:
# resnet18: each block's Add, the 5 block-output Relus not dropped, conv1 -> conv2's quantizer;
# output Q for the 7 block outputs the next block reads (as residual and through conv1's
# quantizer; a downsampling block reads one through two quantizers, conv1's and the shortcut's,
# which differ: one becomes Q, the other stays; the last block's, read by the pooling, has none);
# resnet20: every block's Add and Relu (the zero-padding shortcuts' Pad gets constant pads from
# fold_constants, so shape inference knows its output), output Q for every block output but the
# last's (8: the next block's conv1 quantizes it, its shortcut reads it as float);
# small_cnn: its convs are read by quantizers only; test_model: see ExportTestNet.forward.
FUSIONS = {
    "resnet18": Fusions(8, 5, 11, 4),
    "resnet20": Fusions(9, 9, 9, 8),
    "small_cnn": Fusions(0, 1, 3, 0),
    "test_model": Fusions(1, 3, 2, 1),
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_fusion_pass_leaves_nothing_fusable(name, monkeypatch):
    """The export fuses what the architecture allows; the pass finds nothing more in it."""
    unfused = unfused_model(name, monkeypatch)
    shapes = known_shapes(unfused)  # shape inference sees through every node, ai.adq included
    assert all(o in shapes for n in unfused.graph.node for o in n.output)
    assert fuse_lut_conv(unfused, DOMAIN) == FUSIONS[name]
    model = copy.deepcopy(onnx_model(name, "adq"))
    assert fuse_lut_conv(model, DOMAIN) == Fusions(0, 0, 0)
    nodes = model.graph.node
    fused = [n for n in nodes if n.op_type.startswith("LutConv") and len(n.input) > 5]
    assert len([n for n in fused if n.input[5]]) == FUSIONS[name].residual_adds
    producer = {o: n.op_type for n in nodes for o in n.output}
    after_lut = [n for n in nodes if n.input and producer.get(n.input[0], "").startswith("Lut")]
    if name == "resnet20":  # the zero-padding shortcuts are Residual inputs, their pads constant
        pads = [n for n in nodes if n.op_type == "Pad"]
        consumers = {r.op_type for p in pads for r in nodes if p.output[0] in r.input}
        assert len(pads) == 2 and consumers == {"LutConv"}
        assert all(p.input[1] in {i.name for i in model.graph.initializer} for p in pads)
    assert not [n for n in nodes if n.op_type == "Constant"]  # folded into initializers
    if name.startswith("resnet"):  # but the output affine of resnet18's W8A8 first layer
        adds = [n for n in nodes if n.op_type == "Add"]
        assert [n.input[1] for n in adds] == (["conv1.out_bias"] if name == "resnet18" else [])
    if name == "resnet18":
        assert not [n for n in after_lut if n.op_type in ("Add", "Relu")]
        # the quantizers left: the network input's, the max-pool output's and the W8A8 head's;
        # a block output read by the next (downsampling) block's conv1 and shortcut is two
        # levels outputs
        quantized = [n for n in nodes if n.op_type == "ThresholdQuant"]
        assert sorted(producer.get(n.input[0], "graph input") for n in quantized) == [
            "Flatten",
            "MaxPool",
            "graph input",
        ]
        assert len([n for n in nodes if n.op_type == "LutConvQuant" and len(n.output) == 2]) == 3
    level_outputs = [n for n in nodes if n.op_type == "LutConv" and len(n.output) == 2]
    assert len(level_outputs) == FUSIONS[name].level_outputs


@pytest.mark.parametrize(
    "name, int_codebooks", [(n, False) for n in MODEL_CASES] + [("resnet20", True)]
)
def test_fused_graph_computes_the_unfused_logits(name, int_codebooks, monkeypatch):
    """The reference evaluator gives the fused and the unfused export the same logits."""
    x = case_input(name, batch=3, seed=4)
    fused = run_onnx(onnx_model(name, "adq", int_codebooks=int_codebooks), x)
    plain = run_onnx(unfused_model(name, monkeypatch, int_codebooks), x)
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    np.testing.assert_array_equal(fused.argmax(1), plain.argmax(1))


@pytest.mark.parametrize("name", ["resnet20", "test_model"])
def test_levels_output_gives_the_same_logits(name, monkeypatch):
    """LutConv's output Q in place of the ThresholdQuant after it: bit for bit the same logits
    through the reference evaluator."""
    _, folded = loaded(name)
    x = case_input(name, batch=2, seed=5)
    fused = write_adq(folded)
    with monkeypatch.context() as m:
        m.setattr(graph_module, "fuse_level_output", lambda graph, domain: 0)
        plain = write_adq(folded)
    assert sum(len(n.output) == 2 for n in fused.graph.node) == FUSIONS[name].level_outputs
    assert not [n for n in plain.graph.node if len(n.output) == 2]
    np.testing.assert_array_equal(run_onnx(fused, x), run_onnx(plain, x))
