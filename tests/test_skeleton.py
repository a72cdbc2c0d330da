"""The placeholder skeleton: one ai.adq::QuantLayer per ADQ layer, everything else plain ONNX."""

from __future__ import annotations

import numpy as np
import pytest
from export_helpers import (
    CASES,
    case_input,
    initializers,
    loaded,
    one_thread,
    placeholders,
    quant_layers,
    run_skeleton,
    torch_logits,
)

from exporters.skeleton import DOMAIN, PLACEHOLDER, export_skeleton, with_placeholders

CASES_HERE = ("test_model", "resnet20")


@pytest.fixture(scope="module", params=CASES_HERE)
def raw_skeleton(request):
    """The skeleton before batch-norm absorption (what export_skeleton returns)."""
    ck, _ = loaded(request.param)
    with one_thread():
        skeleton = export_skeleton(ck.model, ck.input["shape"])
    return request.param, ck, skeleton


def test_one_placeholder_per_adq_layer(raw_skeleton):
    _, ck, skeleton = raw_skeleton
    nodes = [n for n in skeleton.graph.node if n.op_type == PLACEHOLDER]
    assert all(n.domain == DOMAIN for n in nodes)
    assert len(nodes) == len(quant_layers(ck.model))
    assert set(placeholders(skeleton)) == set(quant_layers(ck.model))
    for node in nodes:
        assert len(node.input) == 1 and len(node.output) == 1
    assert {o.domain: o.version for o in skeleton.opset_import}[DOMAIN] == 1


def test_layer_internals_are_not_in_the_graph(raw_skeleton):
    """The traced ops of the quantized layers (thresholds, codebook lookup) are dead code."""
    _, _, skeleton = raw_skeleton
    others = [n for n in skeleton.graph.node if n.op_type != PLACEHOLDER]
    assert all(n.domain in ("", "ai.onnx") for n in others)
    ops = {n.op_type for n in others}
    assert not ops & {"Gather", "GreaterOrEqual", "ReduceSum", "Less", "Where", "Round", "Clip"}


def test_float_layers_stay_float(raw_skeleton):
    """The float first layer (and the skipped float conv of the test model) are Conv nodes
    with their batch norm fused by the exporter; every placeholder keeps a plain input."""
    name, ck, skeleton = raw_skeleton
    convs = [n for n in skeleton.graph.node if n.op_type == "Conv"]
    float_convs = {"test_model": 2, "resnet20": 1}[name]  # stem (+ float_conv)
    assert len(convs) == float_convs
    inits = initializers(skeleton)
    for conv in convs:
        assert conv.input[1] in inits
    gemms = [n for n in skeleton.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 1  # the float head / fc


def test_dynamic_batch_axis(raw_skeleton):
    _, _, skeleton = raw_skeleton
    (inp,) = skeleton.graph.input
    (out,) = skeleton.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param
    assert out.type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(
        CASES[raw_skeleton[0]].input_shape
    )


@pytest.mark.parametrize("batch", [1, 5])
def test_skeleton_with_the_pytorch_layers_is_the_model(raw_skeleton, batch):
    """Placeholders computed by the PyTorch layers: the float parts of the graph are exact."""
    name, ck, skeleton = raw_skeleton
    x = case_input(name, batch=batch, seed=batch)
    ref = torch_logits(ck.model, x)
    out = run_skeleton(skeleton, ck.model, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_with_placeholders_leaves_the_model_alone():
    ck, _ = loaded("test_model")
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    wrapped, names = with_placeholders(ck.model)
    assert wrapped is not ck.model
    assert set(names) == set(quant_layers(ck.model))
    assert set(quant_layers(wrapped)) == {f"{n}.layer" for n in names}
    assert set(quant_layers(ck.model)) == set(names)  # the original is not wrapped
    for k, v in ck.model.state_dict().items():
        assert v.equal(before[k])
