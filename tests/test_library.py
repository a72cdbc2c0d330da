"""runtime/library.py: which onnxruntime an export needs, and sessions that fail in one line."""

from __future__ import annotations

import onnx
import onnx.helper as oh
import pytest

from runtime import library
from runtime.library import make_session, oldest_onnxruntime, ort_message


def _model(ops: list[str], opsets: dict[str, int], ir_version: int = 8) -> onnx.ModelProto:
    """A graph X -> op -> ... -> Y (the ops need not make sense: only their names are read)."""
    nodes, prev = [], "X"
    for i, op in enumerate(ops):
        nodes.append(oh.make_node(op, [prev], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(oh.make_node("Identity", [prev], ["Y"]))
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4])],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    imports = [oh.make_opsetid(d, v) for d, v in opsets.items()]
    return oh.make_model(graph, opset_imports=imports, ir_version=ir_version)


@pytest.mark.parametrize(
    ("ops", "opsets", "need"),
    [
        (["Relu"], {"": 25}, (1, 24)),  # standard, UINT2 codes
        (["Relu"], {"": 21}, (1, 23)),  # standard --opset 21, UINT4
        (["Relu"], {"": 17}, (1, 18)),  # standard --opset 17, UINT8
        (["ConvInteger", "Relu"], {"": 21}, (1, 24)),  # int8
        (["Relu"], {"": 20, "ai.adq": 1}, (1, 21)),  # adq: the op library
        (["Relu"], {"ai.onnx": 25}, (1, 24)),
    ],
)
def test_oldest_onnxruntime_follows_the_table_of_docs_export(ops, opsets, need):
    assert oldest_onnxruntime(_model(ops, opsets)) == need


def test_a_model_onnxruntime_cannot_load_is_one_value_error_line(tmp_path, monkeypatch):
    path = tmp_path / "future.onnx"
    onnx.save(_model(["Relu"], {"": 17}, ir_version=99), path)  # no onnxruntime reads IR 99
    with pytest.raises(ValueError) as info:
        make_session(path, "standard")
    msg = str(info.value)
    assert "\n" not in msg and "cannot load" in msg and str(path) in msg
    assert "IR version: 99" in msg  # onnxruntime's reason, without its C++ location
    assert "[ONNXRuntimeError]" not in msg and ".cc:" not in msg and "::" not in msg
    assert "needs onnxruntime" not in msg  # 1.18 would do: not a version problem
    # The same failure where the installed onnxruntime is older than the export needs.
    onnx.save(_model(["Relu"], {"": 25}, ir_version=99), path)
    monkeypatch.setattr(library, "installed_onnxruntime", lambda: (1, 21))
    with pytest.raises(ValueError, match=r"needs onnxruntime >= 1\.24 \(docs/export\.md\)$"):
        make_session(path, "standard")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Failed to load model with error: "
            "/src/core/graph/model.cc:180 onnxruntime::Model::Model(onnx::ModelProto&&, "
            "const std::map<std::string, int>&) Unsupported model IR version: 13 (max 10)",
            "Failed to load model with error: Unsupported model IR version: 13 (max 10)",
        ),
        ("first line\n[ONNXRuntimeError] : 1 : FAIL : no location here", "no location here"),
        ("/x.h:3 f(unclosed", "/x.h:3 f(unclosed"),  # not a signature: kept as it is
        ("plain", "plain"),
    ],
)
def test_ort_message_keeps_the_reason(raw, reason):
    assert ort_message(RuntimeError(raw)) == reason
