"""What every ONNX writer shares: swapping placeholders for a format's nodes, and the metadata."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from adq_deploy import __version__

from .fold import FoldedLayer, FoldedModel, placeholder_name
from .graph import add_initializer, compact_names, remove_unused, topological_sort
from .skeleton import DOMAIN, PLACEHOLDER

# emit(graph, layer, x, y) adds the layer's initializers to `graph` and returns its nodes,
# which read value `x` and write value `y`.
Emit = Callable[[onnx.GraphProto, FoldedLayer, str, str], list[onnx.NodeProto]]


def replace_placeholders(folded: FoldedModel, emit: Emit) -> onnx.ModelProto:
    """A copy of the skeleton with each placeholder replaced by emit's nodes, in place."""
    model = copy.deepcopy(folded.skeleton)
    graph = model.graph
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.op_type == PLACEHOLDER and node.domain == DOMAIN:
            layer = folded.layers[placeholder_name(node)]
            graph.node.extend(emit(graph, layer, node.input[0], node.output[0]))
        else:
            graph.node.append(node)
    remove_unused(graph)
    topological_sort(graph)
    compact_names(model)
    return model


def init(graph: onnx.GraphProto, layer: FoldedLayer, suffix: str, array: np.ndarray) -> str:
    """Add an initializer named `<layer>.<suffix>`: a tensor traceable to its checkpoint layer."""
    return add_initializer(graph, f"{layer.name}.{suffix}", array)


def affine_nodes(
    graph: onnx.GraphProto, layer: FoldedLayer, acc: str, y: str, scale: np.ndarray
) -> list[onnx.NodeProto]:
    """y = scale[m] * acc + out_bias[m] with standard Mul / Add (channel axis 1)."""
    shape = [1, -1] + [1] * (2 if layer.kind == "conv" else 0)
    s = init(graph, layer, "out_scale", scale.astype(np.float32).reshape(shape))
    b = init(graph, layer, "out_bias", layer.out_bias.astype(np.float32).reshape(shape))
    scaled = f"{layer.name}/scaled"
    return [
        helper.make_node("Mul", [acc, s], [scaled], name=f"{layer.name}/Mul"),
        helper.make_node("Add", [scaled, b], [y], name=f"{layer.name}/Add"),
    ]


def set_opsets(model: onnx.ModelProto, opset: int, adq_domain: bool) -> None:
    """Default-domain opset and, when used, ai.adq version 1; drop the placeholder domain."""
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", opset))
    if adq_domain:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def set_metadata(model: onnx.ModelProto, folded: FoldedModel, fmt: str, extra: dict) -> None:
    """metadata_props: format, op-set version, bits, input, classes, provenance (all strings)."""
    meta = dict(folded.metadata)
    meta.update(extra)
    props = {
        "adq.format": fmt,
        "adq.opset": f"{DOMAIN}:1" if fmt == "adq" else "none",
        "adq.package_version": __version__,
    }
    for key, value in meta.items():
        props[f"adq.{key}"] = value if isinstance(value, str) else json.dumps(value)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    model.producer_name = "adq-deploy"
    model.producer_version = __version__
