"""Run ONE ai.adq op on NumPy arrays through a one-node graph (tests, C++ op tests)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper

from runtime.reference import run_reference
from runtime.schema import DOMAIN, ELEMENT_TYPES, OPS_BY_NAME, VERSION

# Output rank of each op (onnx.checker wants a shape field on graph outputs); dims stay unknown.
_OUTPUT_RANK = {
    "ThresholdQuant": lambda inputs, attrs: np.ndim(inputs["X"]),
    "LutDequant": lambda inputs, attrs: len(attrs.get("shape", ())),
    "LutConv": lambda inputs, attrs: 4,
    "LutConvQuant": lambda inputs, attrs: 4,
    "LutGemm": lambda inputs, attrs: 2,
    "ConvPoolQuant": lambda inputs, attrs: 4,
    "LutConvPoolQuant": lambda inputs, attrs: 4,
}


def output_names(op_name: str, outputs: tuple[str, ...] | None = None) -> list[str]:
    """The node's output list: the declared outputs named in ``outputs`` (None: the required
    ones), "" for an unlisted optional output before a listed one; ValueError for an unknown or
    a missing required output."""
    decl = OPS_BY_NAME[op_name]
    declared = [p.name for p in decl.outputs]
    wanted = [p.name for p in decl.outputs if not p.optional] if outputs is None else outputs
    unknown = sorted(set(wanted) - set(declared))
    if unknown:
        raise ValueError(f"{op_name}: unknown outputs {unknown}; declared: {declared}")
    missing = [p.name for p in decl.outputs if not p.optional and p.name not in wanted]
    if missing:
        raise ValueError(f"{op_name}: required outputs {missing} missing")
    names = [name if name in wanted else "" for name in declared]
    while names and names[-1] == "":
        names.pop()
    return names


def single_op_model(
    op_name: str,
    inputs: dict[str, np.ndarray],
    attrs: dict | None = None,
    opset: int = 21,
    constants: tuple[str, ...] = (),
    outputs: tuple[str, ...] | None = None,
) -> onnx.ModelProto:
    """A model with one ``op_name`` node; ``inputs`` (by declared name) become graph inputs,
    except those named in ``constants``, which become initializers (as in an exported model).

    Missing optional inputs (absent or None) become "" (trailing ones are left out). ``outputs``
    names the declared outputs the node lists and the graph returns (None: the required ones;
    an optional output is only computed when listed). Graph input types follow the arrays'
    dtypes (so wrong dtypes reach the op); output element types follow the declaration, output
    dims are left unknown (rank only, which onnx.checker requires).
    """
    if op_name not in OPS_BY_NAME:
        raise ValueError(f"unknown ai.adq op {op_name!r}; known: {sorted(OPS_BY_NAME)}")
    decl = OPS_BY_NAME[op_name]
    declared = {p.name for p in decl.inputs}
    unknown = sorted(set(inputs) - declared)
    if unknown:
        raise ValueError(f"{op_name}: unknown inputs {unknown}; declared: {sorted(declared)}")
    out_names = output_names(op_name, outputs)
    names = []
    graph_inputs = []
    initializers = []
    for p in decl.inputs:
        if p.name not in inputs or inputs[p.name] is None:
            if not p.optional:
                raise ValueError(f"{op_name}: required input {p.name} missing")
            names.append("")
            continue
        arr = np.asarray(inputs[p.name])
        if p.name in constants:
            initializers.append(onnx.numpy_helper.from_array(arr, p.name))
        else:
            elem = oh.np_dtype_to_tensor_dtype(arr.dtype)
            graph_inputs.append(oh.make_tensor_value_info(p.name, elem, list(arr.shape)))
        names.append(p.name)
    while names and names[-1] == "":
        names.pop()
    rank = _OUTPUT_RANK[op_name](inputs, attrs or {})
    graph_outputs = [
        oh.make_tensor_value_info(p.name, ELEMENT_TYPES[p.dtype], [None] * rank)
        for p in decl.outputs
        if p.name in out_names
    ]
    node = oh.make_node(op_name, names, out_names, domain=DOMAIN, **(attrs or {}))
    graph = oh.make_graph([node], f"{op_name}_single", graph_inputs, graph_outputs, initializers)
    opsets = [oh.make_opsetid("", opset), oh.make_opsetid(DOMAIN, VERSION)]
    ir = oh.find_min_ir_version_for([opsets[0]])
    return oh.make_model(graph, opset_imports=opsets, ir_version=ir)


def run_single(
    op_name: str,
    inputs: dict[str, np.ndarray],
    attrs: dict | None = None,
    outputs: tuple[str, ...] | None = None,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """The output of ``op_name`` on ``inputs`` through ``ReferenceEvaluator``: one array when
    the node has one output (by default its required outputs, see ``single_op_model``), else a
    tuple in declaration order."""
    model = single_op_model(op_name, inputs, attrs, outputs=outputs)
    feeds = {k: np.asarray(v) for k, v in inputs.items() if v is not None}
    results = tuple(run_reference(model, feeds))
    return results[0] if len(results) == 1 else results
