"""exporters.graph: the Relu that cannot change ThresholdQuant levels is dropped, others kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto, numpy_helper

from exporters.graph import drop_relu_before_thresholds
from runtime.reference import run_reference
from runtime.schema import DOMAIN, VERSION


def relu_then_thresholds(scale: float, thresholds: list[float], extra_reader: bool = False):
    """x -> Relu -> ThresholdQuant (and optionally -> Neg too)."""
    nodes = [
        oh.make_node("Relu", ["x"], ["r"]),
        oh.make_node("ThresholdQuant", ["r", "s", "t"], ["q"], domain=DOMAIN),
    ]
    outputs = [oh.make_tensor_value_info("q", TensorProto.UINT8, [None])]
    if extra_reader:
        nodes.append(oh.make_node("Neg", ["r"], ["n"]))
        outputs.append(oh.make_tensor_value_info("n", TensorProto.FLOAT, [None]))
    inits = [
        numpy_helper.from_array(np.array([scale], np.float32), "s"),
        numpy_helper.from_array(np.array(thresholds, np.float32), "t"),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [None])], outputs, inits
    )
    opsets = [oh.make_opsetid("", 20), oh.make_opsetid(DOMAIN, VERSION)]
    return oh.make_model(graph, opset_imports=opsets)


def test_drops_relu_and_keeps_the_levels():
    model = relu_then_thresholds(0.7, [0.1, 0.5, 2.0])
    x = np.concatenate([np.linspace(-4, 4, 401), [-0.0, 0.0, np.nan, -np.inf, np.inf]])
    x = x.astype(np.float32)
    before = run_reference(model, {"x": x})[0]
    assert drop_relu_before_thresholds(model.graph, DOMAIN) == 1
    assert [n.op_type for n in model.graph.node] == ["ThresholdQuant"]
    assert model.graph.node[0].input[0] == "x"
    np.testing.assert_array_equal(run_reference(model, {"x": x})[0], before)
    assert before.min() == 0 and before.max() == 3  # all levels occur


@pytest.mark.parametrize(
    "scale, thresholds, extra",
    [(0.7, [0.0, 0.5], False), (0.7, [-0.2, 0.5], False), (-1.0, [0.5], False), (1, [1], True)],
)
def test_keeps_relu_that_matters(scale, thresholds, extra):
    """A threshold <= 0, a negative scale, or another reader of the Relu: kept."""
    model = relu_then_thresholds(scale, thresholds, extra)
    assert drop_relu_before_thresholds(model.graph, DOMAIN) == 0
    assert "Relu" in [n.op_type for n in model.graph.node]
    onnx.checker.check_model(model)
