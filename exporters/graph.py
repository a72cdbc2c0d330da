"""Small ONNX graph-editing helpers shared by the folding pass and the writers, and the adq
format's fusions: LutConv epilogues (residual Add, Relu, ThresholdQuant: LutConvQuant or
LutConv's levels output Q), shortcuts, the channels-last region, and the float first layer with
its pooling (ConvPoolQuant)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.schema import OPS_BY_NAME, register_onnx_schemas

STANDARD_DOMAINS = ("", "ai.onnx")
Shape = tuple[int | str, ...]  # each dim a value or a symbol (dim_param)


def consumers(graph: onnx.GraphProto, value: str) -> list[onnx.NodeProto]:
    """Nodes that read `value`."""
    return [n for n in graph.node if value in n.input]


def _producer(graph: onnx.GraphProto, value: str) -> onnx.NodeProto | None:
    """The node that writes ``value`` (None for graph inputs and initializers)."""
    return next((n for n in graph.node if value in n.output), None)


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


def _is(node: onnx.NodeProto, op_type: str, domains: tuple[str, ...]) -> bool:
    return node.op_type == op_type and node.domain in domains


def _attr(node: onnx.NodeProto, name: str, default: int | list[int]) -> int | list[int]:
    """An int or ints attribute's value (ints as a list), default when absent."""
    values = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return values[0] if values else default


def _set_attr(node: onnx.NodeProto, name: str, value: int | list[int]) -> None:
    for a in [a for a in node.attribute if a.name == name]:
        node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(name, value))


def _set_input(node: onnx.NodeProto, k: int, name: str) -> None:
    """Set input k of node, listing "" for absent optional inputs before it."""
    node.input.extend([""] * (k + 1 - len(node.input)))
    node.input[k] = name


def _full_shape(t: onnx.TypeProto) -> Shape | None:
    """A tensor type's shape if every dim is a value or a symbol, else None."""
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[int | str] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            return None
    return tuple(dims)


def known_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Fully known shapes of a model's values (ONNX shape inference, ai.adq ops included; the
    model is not changed): two values with equal shapes here have equal shapes at run time."""
    register_onnx_schemas()
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    shapes: dict[str, Shape] = {i.name: tuple(i.dims) for i in graph.initializer}
    for v in [*graph.input, *graph.value_info, *graph.output]:
        shape = _full_shape(v.type)
        if shape is not None:
            shapes[v.name] = shape
    return shapes


def _residual_of(add: onnx.NodeProto, y: str, shapes: dict[str, Shape]) -> str | None:
    """The other operand of ``Add(y, r)`` (either order) if r provably has y's shape."""
    if not _is(add, "Add", STANDARD_DOMAINS) or len(add.input) != 2 or len(add.output) != 1:
        return None
    others = [i for i in add.input if i != y]
    if len(others) != 1 or y not in shapes:
        return None
    return others[0] if shapes.get(others[0]) == shapes[y] else None


def _sole_reader(graph: onnx.GraphProto, value: str, outputs: set[str]) -> onnx.NodeProto | None:
    """The only node that reads ``value``, when it is not also a graph output."""
    readers = consumers(graph, value)
    return readers[0] if len(readers) == 1 and value not in outputs else None


def fuse_residual_relu(model: onnx.ModelProto, domain: str) -> tuple[int, int]:
    """Fold ``LutConv -> Add(y, r) [-> Relu]`` into LutConv(Residual=r[, relu=1]) and
    ``LutConv -> Relu`` into LutConv(relu=1), where the LutConv output (and the Add output when
    a Relu follows) has no other reader and r provably has the output's shape (the op does not
    broadcast). The same float32 operations, one node. Returns (Adds, Relus) fused."""
    graph = model.graph
    shapes = known_shapes(model)
    outputs = {o.name for o in graph.output}
    adds = relus = 0
    for lut in [n for n in graph.node if _is(n, "LutConv", (domain,))]:
        if _attr(lut, "relu", 0) or _has_levels(lut):  # Q is the levels of Y as it is
            continue
        reader = _sole_reader(graph, lut.output[0], outputs)
        residual = None if reader is None else _residual_of(reader, lut.output[0], shapes)
        if residual is not None and not _residual(lut):
            _set_input(lut, _input_index(lut.op_type, "Residual"), residual)
            lut.output[0] = reader.output[0]
            graph.node.remove(reader)
            adds += 1
            reader = _sole_reader(graph, lut.output[0], outputs)
        if reader is not None and _is(reader, "Relu", STANDARD_DOMAINS):
            _set_attr(lut, "relu", 1)
            lut.output[0] = reader.output[0]
            graph.node.remove(reader)
            relus += 1
    topological_sort(graph)
    return adds, relus


def _quantizes(node: onnx.NodeProto, y: str, domain: str) -> bool:
    """Whether node is an ai.adq ThresholdQuant of y (y as its X only)."""
    return (
        _is(node, "ThresholdQuant", (domain,))
        and len(node.input) == 3
        and node.input[0] == y
        and y not in node.input[1:]
    )


def _has_levels(lut: onnx.NodeProto) -> bool:
    """Whether a LutConv lists its second output Q (or its inputs QScale, QThresholds)."""
    q = _input_index(lut.op_type, "QScale")
    return any(lut.output[1:]) or any(lut.input[q : q + 2])


def _upstream(graph: onnx.GraphProto, values: list[str]) -> set[str]:
    """The values ``values`` are computed from, themselves included."""
    producers = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    pending = list(values)
    while pending:
        v = pending.pop()
        if v in seen or not v:  # "": an absent optional input
            continue
        seen.add(v)
        if v in producers:
            pending.extend(producers[v].input)
    return seen


def _can_merge(
    graph: onnx.GraphProto, lut: onnx.NodeProto, tqs: list[onnx.NodeProto], outputs: set[str]
) -> bool:
    """Whether ``_merge_quantizers`` may merge ``tqs`` into ``lut``: there are some, their Scale
    and Thresholds are the same and not computed from ``lut`` (a cycle once they are its inputs),
    and at most one of their levels is a graph output."""
    if not tqs or len({tuple(t.input[1:]) for t in tqs}) != 1:
        return False
    if set(lut.output) & _upstream(graph, list(tqs[0].input[1:])):
        return False
    return sum(t.output[0] in outputs for t in tqs) <= 1


def _merge_quantizers(
    graph: onnx.GraphProto, lut: onnx.NodeProto, tqs: list[onnx.NodeProto], outputs: set[str]
) -> tuple[str, str, str]:
    """Remove the ThresholdQuant nodes ``tqs`` of ``lut``'s output, which ``_can_merge`` allows,
    and rewire the readers of their levels to one of them (the graph output, if one is);
    (levels, Scale, Thresholds) to give ``lut``."""
    qscale, qthresholds = tqs[0].input[1:]
    levels = [t.output[0] for t in tqs]
    public = [q for q in levels if q in outputs]
    q = public[0] if public else levels[0]
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in levels:
                node.input[k] = q
    for t in tqs:
        graph.node.remove(t)
    return q, qscale, qthresholds


def _quantizer_groups(
    readers: list[onnx.NodeProto], y: str, domain: str
) -> dict[tuple[str, ...], list[onnx.NodeProto]]:
    """The ThresholdQuant nodes of y among ``readers``, grouped by (Scale, Thresholds)."""
    groups: dict[tuple[str, ...], list[onnx.NodeProto]] = {}
    for r in readers:
        if _quantizes(r, y, domain):
            groups.setdefault(tuple(r.input[1:]), []).append(r)
    return groups


def _lut_convs(graph: onnx.GraphProto, domain: str) -> list[onnx.NodeProto]:
    """The LutConv nodes without output Q (those a fusion may still change)."""
    return [n for n in graph.node if _is(n, "LutConv", (domain,)) and not _has_levels(n)]


def fuse_threshold_quant(graph: onnx.GraphProto, domain: str) -> int:
    """Turn each ``LutConv -> ThresholdQuant`` into one LutConvQuant (QScale, QThresholds = the
    ThresholdQuant's Scale, Thresholds) where the LutConv output is no graph output and is read
    only by ThresholdQuant nodes with one Scale and Thresholds, or two (the second as QScale2,
    QThresholds2 and output Q2: a block output read by the next block's convolution and by its
    downsampling shortcut); the readers of each quantizer's levels are rewired to one of them.
    Returns how many."""
    outputs = {o.name for o in graph.output}
    fused = 0
    for lut in _lut_convs(graph, domain):
        y = lut.output[0]
        readers = consumers(graph, y)
        if y in outputs or not all(_quantizes(r, y, domain) for r in readers):
            continue
        groups = _quantizer_groups(readers, y, domain)
        if not 1 <= len(groups) <= 2 or not all(
            _can_merge(graph, lut, tqs, outputs) for tqs in groups.values()
        ):
            continue
        merged = [_merge_quantizers(graph, lut, tqs, outputs) for tqs in groups.values()]
        lut.op_type = "LutConvQuant"
        del lut.output[:]
        for (q, qscale, qthresholds), suffix in zip(merged, ("", "2")[: len(merged)], strict=True):
            _set_input(lut, _input_index(lut.op_type, f"QScale{suffix}"), qscale)
            _set_input(lut, _input_index(lut.op_type, f"QThresholds{suffix}"), qthresholds)
            lut.output.append(q)
        fused += 1
    topological_sort(graph)
    return fused


def fuse_level_output(graph: onnx.GraphProto, domain: str) -> int:
    """Give a LutConv whose output y is read by ThresholdQuant nodes and also by other nodes (or
    is a graph output, or read by quantizers with other parameters) the second output Q: the
    levels of the largest group of those ThresholdQuants with the same Scale and Thresholds
    (as inputs 6, 7). That group's nodes go, the readers of their levels read Q: a residual
    block's output is written once as float (the next residual) and once as levels (the next
    conv). Returns how many."""
    outputs = {o.name for o in graph.output}
    fused = 0
    for lut in _lut_convs(graph, domain):
        y = lut.output[0]
        readers = consumers(graph, y)
        groups = _quantizer_groups(readers, y, domain)
        if len(groups) == 1 and sum(map(len, groups.values())) == len(readers) and y not in outputs:
            continue  # nothing needs the float y: fuse_threshold_quant's case
        # Quantizers with other parameters (a downsampling block's shortcut) keep reading y.
        tqs = max(groups.values(), key=len, default=[])
        if not _can_merge(graph, lut, tqs, outputs):
            continue
        q, qscale, qthresholds = _merge_quantizers(graph, lut, tqs, outputs)
        _set_input(lut, _input_index(lut.op_type, "QScale"), qscale)
        _set_input(lut, _input_index(lut.op_type, "QThresholds"), qthresholds)
        del lut.output[1:]
        lut.output.append(q)
        fused += 1
    topological_sort(graph)
    return fused


@dataclass(frozen=True)
class Fusions:
    """How many nodes the adq fusion pass folded into LutConv / LutConvQuant: residual Adds,
    Relus, LutConvQuant nodes made, and LutConv nodes given the levels output Q."""

    residual_adds: int
    relus: int
    threshold_quants: int
    level_outputs: int = 0


def fuse_lut_conv(model: onnx.ModelProto, domain: str) -> Fusions:
    """The adq format's fusion pass: residual Adds and Relus into LutConv, then each
    ``LutConv -> ThresholdQuant`` into LutConvQuant where nothing else reads the float output,
    and into LutConv's levels output Q where something does; dead nodes removed, order kept
    valid."""
    adds, relus = fuse_residual_relu(model, domain)
    quants = fuse_threshold_quant(model.graph, domain)
    levels = fuse_level_output(model.graph, domain)
    remove_unused(model.graph)
    return Fusions(adds, relus, quants, levels)


_CONVS = ("LutConv", "LutConvQuant")


def _padded(names, n: int) -> list[str]:
    """The first n of a node's input names, "" for those it does not list."""
    return list(names[:n]) + [""] * (n - len(names[:n]))


def _input_index(op_type: str, name: str) -> int:
    """The position of input ``name`` of an ai.adq op, as runtime/schema.py declares it (LutConv
    and LutConvQuant: Residual 5, QScale 6; ShortcutX 8 and 10)."""
    return [p.name for p in OPS_BY_NAME[op_type].inputs].index(name)


def _shortcut_index(node: onnx.NodeProto) -> int:
    """Where a LutConv's or LutConvQuant's shortcut inputs start."""
    return _input_index(node.op_type, "ShortcutX")


def _residual(node: onnx.NodeProto) -> str:
    """A LutConv's or LutConvQuant's Residual input ("" when absent)."""
    return _padded(node.input, _input_index(node.op_type, "Residual") + 1)[-1]


def _is_shortcut_conv(node: onnx.NodeProto, domain: str) -> bool:
    """A 1x1 LutConv / LutConvQuant without padding, dilation, groups or a shortcut of its own,
    with a Residual: what fuse_shortcut folds into the Residual's producer."""
    return (
        node.domain == domain
        and node.op_type in _CONVS
        and _attr(node, "kernel_shape", []) == [1, 1]
        and not any(_attr(node, "pads", [0] * 4))
        and _attr(node, "dilations", [1, 1]) == [1, 1]
        and _attr(node, "group", 1) == 1
        and _residual(node) != ""
        and not any(node.input[_shortcut_index(node) :])
    )


def fuse_shortcut(graph: onnx.GraphProto, domain: str) -> int:
    """Fold each downsampling shortcut into the convolution whose output it adds: a 1x1
    LutConv(Quant) B whose Residual is the float output of a LutConv A (no epilogue of its own,
    read by B alone) becomes A with B's convolution as its shortcut inputs and B's epilogue and
    outputs, so A's float tensor is never written (docs/onnx-ops.md, Shortcut). Returns the
    number of shortcuts folded."""
    outputs = {o.name for o in graph.output}
    fused = 0
    for b in [n for n in graph.node if _is_shortcut_conv(n, domain)]:
        r = _residual(b)
        a = _producer(graph, r)
        if (
            a is None
            or not _is(a, "LutConv", (domain,))
            or list(a.output) != [r]
            or any(a.input[_input_index(a.op_type, "Residual") :])
            or _attr(a, "relu", 0)
            or _attr(a, "channels_last", 0) != _attr(b, "channels_last", 0)
            or r in outputs
            or consumers(graph, r) != [b]
            or list(b.input).count(r) != 1
        ):
            continue
        k, res = _shortcut_index(b), _input_index(b.op_type, "Residual")
        head = _padded(a.input, res)  # X, Codes, Codebook, Scale, Bias
        quant = _padded(b.input, k)[res + 1 :]  # B's quantizer inputs
        a.op_type = b.op_type
        a.input[:] = [*head, "", *quant, *_padded(b.input, res)]
        while a.input and a.input[-1] == "":
            del a.input[-1]
        _set_attr(a, "relu", _attr(b, "relu", 0))
        _set_attr(a, "shortcut_bits", _attr(b, "bits", 0))
        _set_attr(a, "shortcut_strides", _attr(b, "strides", [1, 1]))
        a.output[:] = list(b.output)
        graph.node.remove(b)
        fused += 1
    if fused:
        topological_sort(graph)
    return fused


def _mean_over_positions(graph: onnx.GraphProto, gap: onnx.NodeProto, x: str) -> onnx.NodeProto:
    """Make GlobalAveragePool node ``gap`` a ReduceMean over axes 1, 2 of the NHWC tensor x (a
    Transpose of the whole tensor back to NCHW cost 2 ms at batch 32 on ResNet-18's last layer);
    returns the Transpose of its [N, 1, 1, C] result to the pool's [N, C, 1, 1] output."""
    out = gap.output[0]
    axes = add_initializer(graph, f"{out}_axes", np.array([1, 2], np.int64))
    gap.op_type = "ReduceMean"
    gap.input[:] = [x, axes]
    gap.output[:] = [f"{out}_nhwc"]
    del gap.attribute[:]
    gap.attribute.append(helper.make_attribute("keepdims", 1))
    return helper.make_node("Transpose", [f"{out}_nhwc"], [out], perm=[0, 3, 1, 2])


def to_channels_last(graph: onnx.GraphProto, domain: str) -> int:
    """Run every LutConv / LutConvQuant with channels_last = 1, so that the activations passed
    between them are NHWC: a Transpose where a tensor enters the region (shared by its readers)
    and one back where it leaves (to other nodes or as a graph output, under its old name). A
    ThresholdQuant read only by those convolutions joins the region (elementwise with a scalar
    scale, it does not care about the layout); a GlobalAveragePool of a leaving tensor becomes a
    ReduceMean of its NHWC form. Returns the number of convolutions set."""
    nodes = list(graph.node)
    convs = [i for i, n in enumerate(nodes) if n.domain == domain and n.op_type in _CONVS]
    if not convs:
        return 0
    readers: dict[str, list[tuple[int, int]]] = {}  # value -> (node index, input index)
    for i, n in enumerate(nodes):
        for k, v in enumerate(n.input):
            readers.setdefault(v, []).append((i, k))
    inside = set(convs)
    for i, n in enumerate(nodes):
        if _is(n, "ThresholdQuant", (domain,)):
            rs = readers.get(n.output[0], [])
            if rs and all(j in inside and k == 0 for j, k in rs):
                inside.add(i)
    graph_outputs = {o.name for o in graph.output}
    added: list[onnx.NodeProto] = []
    # Tensors leaving the region: the producer writes NAME_nhwc, a Transpose restores NAME.
    for i in sorted(inside):
        for o, name in enumerate(nodes[i].output):
            rs = readers.get(name, [])
            if name and (name in graph_outputs or any(j not in inside for j, _ in rs)):
                nhwc = f"{name}_nhwc"
                nodes[i].output[o] = nhwc
                pools = [j for j, _ in rs if _is(nodes[j], "GlobalAveragePool", STANDARD_DOMAINS)]
                if name in graph_outputs or any(j not in inside and j not in pools for j, _ in rs):
                    added.append(helper.make_node("Transpose", [nhwc], [name], perm=[0, 3, 1, 2]))
                for j, k in rs:
                    if j in inside:
                        nodes[j].input[k] = nhwc
                    elif j in pools:
                        added.append(_mean_over_positions(graph, nodes[j], nhwc))
    produced = {o for i in inside for o in nodes[i].output if o}
    # Tensors entering the region: one Transpose to NHWC per tensor.
    entering: dict[str, str] = {}
    for i in sorted(inside):
        n = nodes[i]
        entries = ("X", "Residual", "ShortcutX") if n.op_type in _CONVS else ("X",)
        for k in (_input_index(n.op_type, entry) for entry in entries):
            name = _padded(n.input, k + 1)[k]
            if name and name not in produced:
                if name not in entering:
                    entering[name] = f"{name}_to_nhwc"
                    added.append(
                        helper.make_node("Transpose", [name], [entering[name]], perm=[0, 2, 3, 1])
                    )
                n.input[k] = entering[name]
    for i in convs:
        _set_attr(nodes[i], "channels_last", 1)
    graph.node.extend(added)
    topological_sort(graph)
    return len(convs)


def _window_ok(node: onnx.NodeProto, kernel: list[int]) -> bool:
    """Whether a Conv / MaxPool node has the plain window ConvPoolQuant computes: 2-D, explicit
    pads (no auto_pad), dilations 1, and for MaxPool floor rounding, one output, pads below the
    window and windows of at most 64."""
    if len(kernel) != 2 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    if _attr(node, "dilations", [1, 1]) != [1, 1] or len(_attr(node, "strides", [1, 1])) != 2:
        return False
    pads = _attr(node, "pads", [0, 0, 0, 0])
    if len(pads) != 4 or min(pads) < 0:
        return False
    if node.op_type == "MaxPool":
        if len(node.output) != 1 or _attr(node, "ceil_mode", 0) or _attr(node, "storage_order", 0):
            return False
        return max(kernel) <= 64 and all(pads[d] < kernel[d % 2] for d in range(4))
    return True


def _stem_chains(graph: onnx.GraphProto, domain: str, ops: tuple[str, ...]):
    """Each ``ThresholdQuant`` of an NHWC Transpose with the standard nodes ``ops`` (bottom up,
    each optional but the last) above it, every tensor in between read only by the next node:
    yields (ThresholdQuant, Transpose, chain from the Transpose up)."""
    outputs = {o.name for o in graph.output}
    for tq in [n for n in graph.node if _is(n, "ThresholdQuant", (domain,))]:
        t = _producer(graph, tq.input[0])
        if t is None or not _is(t, "Transpose", STANDARD_DOMAINS):
            continue
        if _attr(t, "perm", []) != [0, 2, 3, 1] or t.output[0] in outputs:
            continue
        if sum(_is(r, "ThresholdQuant", (domain,)) for r in consumers(graph, t.output[0])) != 1:
            continue
        chain, value = [t], t.input[0]
        for op_type in ops:
            node = _producer(graph, value)
            if node is None or _sole_reader(graph, value, outputs) != chain[-1]:
                break
            if _is(node, op_type, STANDARD_DOMAINS):
                chain.append(node)
                value = node.input[0]
        if chain[-1].op_type == ops[-1]:
            yield tq, t, chain


def _pool_attrs(chain: list[onnx.NodeProto], conv: onnx.NodeProto, kernel: list[int]) -> dict:
    """ConvPoolQuant's window attributes from a chain, or {} where it cannot take them."""
    pool = next((n for n in chain if n.op_type == "MaxPool"), None)
    if not _window_ok(conv, kernel) or not (
        pool is None or _window_ok(pool, _attr(pool, "kernel_shape", []))
    ):
        return {}
    attrs: dict[str, int | list[int]] = {
        "kernel_shape": kernel,
        "strides": _attr(conv, "strides", [1, 1]),
        "pads": _attr(conv, "pads", [0, 0, 0, 0]),
        "relu": int(any(n.op_type == "Relu" for n in chain)),
    }
    if pool is not None:
        attrs["pool_kernel_shape"] = _attr(pool, "kernel_shape", [])
        attrs["pool_strides"] = _attr(pool, "strides", [1, 1])
        attrs["pool_pads"] = _attr(pool, "pads", [0, 0, 0, 0])
    return attrs


def _replace(graph: onnx.GraphProto, old: list[onnx.NodeProto], node: onnx.NodeProto) -> None:
    for n in old:
        graph.node.remove(n)
    graph.node.append(node)


def fuse_conv_pool_quant(graph: onnx.GraphProto, domain: str) -> int:
    """Fold a float first layer up to the next layer's levels, ``Conv [-> Relu] [-> MaxPool]
    -> Transpose to NHWC -> ThresholdQuant``, into one ConvPoolQuant (docs/onnx-ops.md) where the
    Conv has one group and a constant 4-D weight, and each tensor before the Transpose has no
    other reader. The Transpose's output stays (as Y) for its other readers, such as the first
    residual block. Returns the number of nodes made."""
    fused = 0
    for tq, t, chain in list(_stem_chains(graph, domain, ("MaxPool", "Relu", "Conv"))):
        conv = chain[-1]
        w = constant_value(graph, conv.input[1])
        if w is None or w.ndim != 4 or w.dtype != np.float32 or _attr(conv, "group", 1) != 1:
            continue
        attrs = _pool_attrs(chain, conv, list(w.shape[2:]))
        if not attrs:
            continue
        node = helper.make_node(
            "ConvPoolQuant",
            [*_padded(conv.input, 3), tq.input[1], tq.input[2]],  # X, W, B; QScale, QThresholds
            [t.output[0], tq.output[0]],
            name=f"{conv.name or conv.output[0]}/ConvPoolQuant",
            domain=domain,
            **attrs,
        )
        _replace(graph, [*chain, tq], node)
        fused += 1
    if fused:
        topological_sort(graph)
    return fused


def _channel_vector(value: np.ndarray | None, m: int) -> np.ndarray | None:
    """A per-channel float32 constant (scalar, [M], [M, 1, 1] or [1, M, 1, 1]) as [M]."""
    if value is None or value.dtype != np.float32:
        return None
    if value.size != 1 and value.shape not in ((m,), (m, 1, 1), (1, m, 1, 1)):
        return None
    return np.broadcast_to(value.reshape(-1), (m,)).astype(np.float32)


def fuse_lut_conv_pool_quant(graph: onnx.GraphProto, domain: str) -> int:
    """Fold an integer first layer (a quantized network input) up to the next layer's levels,
    ``DequantizeLinear(levels) -> Conv(LutDequant weight) [-> Mul] [-> Add] [-> Relu]
    [-> MaxPool] -> Transpose to NHWC -> ThresholdQuant``, into one LutConvPoolQuant that reads
    the uint8 levels and the packed codes themselves (docs/onnx-ops.md): Scale is the level step
    times the Mul's per-channel factor, Bias the Add's, x_zero_point the levels' zero point.
    Same conditions as fuse_conv_pool_quant. Returns the number of nodes made."""
    outputs = {o.name for o in graph.output}
    ops = ("MaxPool", "Relu", "Add", "Mul", "Conv")
    fused = 0
    for tq, t, chain in list(_stem_chains(graph, domain, ops)):
        conv = chain[-1]
        dq, lut = _producer(graph, conv.input[0]), _producer(graph, conv.input[1])
        if dq is None or not _is(dq, "DequantizeLinear", STANDARD_DOMAINS):
            continue
        if lut is None or not _is(lut, "LutDequant", (domain,)) or _padded(conv.input, 3)[2]:
            continue
        if any(_sole_reader(graph, v, outputs) != conv for v in (dq.output[0], lut.output[0])):
            continue
        step = constant_value(graph, dq.input[1])
        zp = constant_value(graph, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        shape = _attr(lut, "shape", [])
        if step is None or step.size != 1 or zp is None or zp.dtype != np.uint8 or zp.size != 1:
            continue
        if len(shape) != 4 or _attr(conv, "group", 1) != 1:
            continue
        m = shape[0]
        mul = next((n for n in chain if n.op_type == "Mul"), None)
        add = next((n for n in chain if n.op_type == "Add"), None)
        factor = np.ones(m, np.float32) if mul is None else _operand(graph, mul, m)
        bias = np.zeros(m, np.float32) if add is None else _operand(graph, add, m)
        attrs = _pool_attrs(chain, conv, list(shape[2:]))
        if factor is None or bias is None or not attrs:
            continue
        scale = add_initializer(graph, f"{conv.name}/Scale", (step.astype(np.float32) * factor))
        bias_name = add_initializer(graph, f"{conv.name}/Bias", bias)
        node = helper.make_node(
            "LutConvPoolQuant",
            [dq.input[0], *lut.input[:2], scale, bias_name, tq.input[1], tq.input[2]],
            [t.output[0], tq.output[0]],
            name=f"{conv.name or conv.output[0]}/LutConvPoolQuant",
            domain=domain,
            bits=_attr(lut, "bits", 0),
            x_zero_point=int(zp.reshape(-1)[0]),
            **attrs,
        )
        _replace(graph, [dq, lut, *chain, tq], node)
        fused += 1
    if fused:
        remove_unused(graph)
        topological_sort(graph)
    return fused


def _operand(graph: onnx.GraphProto, node: onnx.NodeProto, m: int) -> np.ndarray | None:
    """The per-channel constant operand of a Mul / Add on the chain (the other one flows)."""
    return _channel_vector(constant_value(graph, node.input[1]), m)


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


# Ops whose output is not a function of their inputs' values (not folded).
NOT_FOLDABLE = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
}
FOLD_MAX_ELEMENTS = 1 << 16  # a folded value is stored in the file: only small ones


def fold_constants(model: onnx.ModelProto) -> int:
    """Replace standard-domain nodes whose inputs are all constant (initializers, outputs of
    such nodes) by initializers of their values, computed by ``onnx.reference``; values of
    more than FOLD_MAX_ELEMENTS elements are left to be computed. Returns the nodes removed.

    onnxsim does this for the standard formats; it cannot run the ai.adq ops, so the adq format
    does it here. The TorchScript exporter computes e.g. the pads of ``F.pad`` from a chain of
    Constant, ConstantOfShape, Concat, Reshape, Slice, Transpose, Cast nodes: once the pads are an
    initializer, shape inference knows the Pad's output shape (the fusion pass needs it)."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    values: dict[str, np.ndarray] = {}  # the folded nodes' outputs

    def constant(name: str) -> onnx.TensorProto:
        return inits[name] if name in inits else numpy_helper.from_array(values[name], name)

    folded: list[onnx.NodeProto] = []
    for node in graph.node:
        if (
            node.domain not in STANDARD_DOMAINS
            or node.op_type in NOT_FOLDABLE
            or any(i and i not in inits and i not in values for i in node.input)
        ):
            continue
        single = helper.make_model(
            helper.make_graph(
                [node],
                "fold",
                [],
                [helper.make_value_info(o, onnx.TypeProto()) for o in node.output],
                [constant(i) for i in dict.fromkeys(node.input) if i],
            ),
            opset_imports=list(model.opset_import),
        )
        try:
            arrays = [np.asarray(r) for r in ReferenceEvaluator(single).run(None, {})]
        except Exception:  # an op or case the reference does not run: left to the runtime
            continue
        if any(a.size > FOLD_MAX_ELEMENTS or a.dtype == object for a in arrays):
            continue
        values.update(zip(node.output, arrays, strict=True))
        folded.append(node)
    if not folded:
        return 0
    for node in folded:
        graph.node.remove(node)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in folded:
        for name in node.output:
            if name in read and name not in inits:
                graph.initializer.append(numpy_helper.from_array(values[name], name))
    remove_unused(graph)
    return len(folded)


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
