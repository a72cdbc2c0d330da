"""Small ONNX graph-editing helpers shared by the folding pass and the writers."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import numpy_helper


def consumers(graph: onnx.GraphProto, value: str) -> list[onnx.NodeProto]:
    """Nodes that read `value`."""
    return [n for n in graph.node if value in n.input]


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The array behind a value if it is an initializer (through Identity nodes), else None."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    seen = 0
    while name not in inits:
        node = producers.get(name)
        if node is None or node.op_type != "Identity" or seen > len(graph.node):
            return None
        name = node.input[0]
        seen += 1
    return numpy_helper.to_array(inits[name])


def _levels_ignore_sign(graph: onnx.GraphProto, node: onnx.NodeProto, x: str, domain: str) -> bool:
    """Whether node is a ThresholdQuant of x whose levels are the same for x and relu(x): a
    positive constant Scale and positive constant Thresholds (x <= 0 gives level 0 either way)."""
    if node.op_type != "ThresholdQuant" or node.domain != domain or node.input[0] != x:
        return False
    scale, thresholds = constant_value(graph, node.input[1]), constant_value(graph, node.input[2])
    if scale is None or thresholds is None or thresholds.size == 0:
        return False
    return bool(np.all(scale > 0) and np.all(thresholds > 0))


def drop_relu_before_thresholds(graph: onnx.GraphProto, domain: str) -> int:
    """Remove each Relu read only by ThresholdQuant nodes whose levels ignore the sign of their
    input (#{i : s * relu(x) >= T_i} = #{i : s * x >= T_i} when s > 0 and every T_i > 0).
    Returns how many."""
    outputs = {o.name for o in graph.output}
    dropped = 0
    for relu in [n for n in graph.node if n.op_type == "Relu" and n.domain in ("", "ai.onnx")]:
        y = relu.output[0]
        readers = consumers(graph, y)
        if y in outputs or not readers:
            continue
        if not all(_levels_ignore_sign(graph, r, y, domain) for r in readers):
            continue
        for r in readers:
            r.input[0] = relu.input[0]
        graph.node.remove(relu)
        dropped += 1
    return dropped


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (to a fixpoint), then unread initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    """Add (or replace) an initializer; returns its name."""
    for init in [i for i in graph.initializer if i.name == name]:
        graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so every input is produced before it is read (ONNX requires it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progress = False
        for n in list(pending):
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                pending.remove(n)
                progress = True
        if not progress:
            raise ValueError(f"graph has a cycle or a missing input near node {pending[0].name!r}")
    del graph.node[:]
    graph.node.extend(ordered)


def compact_names(model: onnx.ModelProto) -> None:
    """Short names for intermediate values, no node names, doc strings or value_info.

    The exporter's names (e.g. '/layer1/layer1.0/relu1/Relu_output_0') cost more bytes than a
    small low-bit network's weights; graph inputs, outputs and initializers keep their names.
    """
    graph = model.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    keep |= {i.name for i in graph.initializer}
    mapping: dict[str, str] = {}
    fresh = (f"v{k}" for k in itertools.count())
    for node in graph.node:
        for out in node.output:
            if out and out not in keep and out not in mapping:
                # A kept name may itself look like 'v12' (onnxsim turns folded values into
                # initializers that keep their names): never hand that name out again.
                mapping[out] = next(v for v in fresh if v not in keep)
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for k, name in enumerate(node.input):
            node.input[k] = mapping.get(name, name)
        for k, name in enumerate(node.output):
            node.output[k] = mapping.get(name, name)
    del graph.value_info[:]
    graph.doc_string = ""
