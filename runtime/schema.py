"""The ai.adq op set, declared once: names, inputs, outputs, attributes (docs/onnx-ops.md).

The exporter, the NumPy references, the tests and onnx.checker (through registered
onnx.defs.OpSchema objects) all read these declarations. The registered schemas also carry
type-and-shape inference functions, so ``onnx.shape_inference.infer_shapes`` sees through the
ai.adq nodes of an exported graph (the exporter's fusion pass relies on it).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import onnx
import onnx.defs
import onnx.helper
import onnx.shape_inference

DOMAIN = "ai.adq"
VERSION = 1


@dataclass(frozen=True)
class Param:
    """One input or output: name, element type, optional."""

    name: str
    dtype: str  # "uint8" or "float"
    optional: bool = False


@dataclass(frozen=True)
class Attr:
    """One attribute: name, kind ('int' or 'ints'), default (None = required)."""

    name: str
    kind: str
    default: int | tuple[int, ...] | None = None


@dataclass(frozen=True)
class OpDecl:
    """An ai.adq op: the single declaration every other piece reads."""

    name: str
    doc: str
    inputs: tuple[Param, ...]
    outputs: tuple[Param, ...]
    attrs: tuple[Attr, ...] = ()


_LUT_INPUTS = (
    Param("X", "uint8"),
    Param("Codes", "uint8"),
    Param("Codebook", "float"),
    Param("Scale", "float"),
    Param("Bias", "float", optional=True),
)
_RESIDUAL = Param("Residual", "float", optional=True)
# LutConvQuant's (and LutConv's optional) ThresholdQuant parameters
_QUANT = (Param("QScale", "float"), Param("QThresholds", "float"))
# LutConvQuant's optional second quantizer (output Q2)
_QUANT2 = (Param("QScale2", "float", optional=True), Param("QThresholds2", "float", optional=True))
# The optional 1x1 shortcut convolution whose output is added in place of a Residual
_SHORTCUT = (
    Param("ShortcutX", "uint8", optional=True),
    Param("ShortcutCodes", "uint8", optional=True),
    Param("ShortcutCodebook", "float", optional=True),
    Param("ShortcutScale", "float", optional=True),
    Param("ShortcutBias", "float", optional=True),
)
_CONV_ATTRS = (
    Attr("bits", "int"),
    Attr("kernel_shape", "ints"),
    Attr("strides", "ints", (1, 1)),
    Attr("pads", "ints", (0, 0, 0, 0)),
    Attr("dilations", "ints", (1, 1)),
    Attr("group", "int", 1),
    Attr("relu", "int", 0),
    Attr("channels_last", "int", 0),
    Attr("shortcut_bits", "int", 0),
    Attr("shortcut_strides", "ints", (1, 1)),
)

OPS: tuple[OpDecl, ...] = (
    OpDecl(
        "ThresholdQuant",
        "Q = #{i : Scale * X >= Thresholds[i]} as uint8 (N2UQ forward).",
        (Param("X", "float"), Param("Scale", "float"), Param("Thresholds", "float")),
        (Param("Q", "uint8"),),
    ),
    OpDecl(
        "LutDequant",
        "W = Codebook[unpack(Codes, bits)] reshaped to `shape` (row-packed codes).",
        (Param("Codes", "uint8"), Param("Codebook", "float")),
        (Param("W", "float"),),
        (Attr("bits", "int"), Attr("shape", "ints")),
    ),
    OpDecl(
        "LutConv",
        "Y = [relu](Scale[m] * conv(X, Codebook[unpack(Codes)]) + Bias[m] [+ Residual]) on uint8 "
        "levels X; optional Q = ThresholdQuant(Y, QScale, QThresholds) (with both inputs); "
        "optionally a 1x1 shortcut convolution added in place of Residual.",
        _LUT_INPUTS + (_RESIDUAL, *(replace(p, optional=True) for p in _QUANT), *_SHORTCUT),
        (Param("Y", "float"), Param("Q", "uint8", optional=True)),
        _CONV_ATTRS,
    ),
    OpDecl(
        "LutConvQuant",
        "Q = ThresholdQuant(LutConv(X, Codes, Codebook, Scale, Bias, Residual), QScale, "
        "QThresholds): the next layer's uint8 levels without the float tensor; optional Q2 the "
        "same with QScale2, QThresholds2 (a second reader's quantizer).",
        _LUT_INPUTS + (_RESIDUAL, *_QUANT, *_QUANT2, *_SHORTCUT),
        (Param("Q", "uint8"), Param("Q2", "uint8", optional=True)),
        _CONV_ATTRS,
    ),
    OpDecl(
        "ConvPoolQuant",
        "Y = MaxPool([relu](Conv(X, W) + B)) channels last, Q = ThresholdQuant(Y, QScale, "
        "QThresholds): a float first layer, its max pooling and the next layer's levels in one "
        "pass.",
        (
            Param("X", "float"),
            Param("W", "float"),
            Param("B", "float", optional=True),
            *_QUANT,
        ),
        (Param("Y", "float"), Param("Q", "uint8")),
        (
            Attr("kernel_shape", "ints"),
            Attr("strides", "ints", (1, 1)),
            Attr("pads", "ints", (0, 0, 0, 0)),
            Attr("relu", "int", 0),
            Attr("pool_kernel_shape", "ints", (1, 1)),
            Attr("pool_strides", "ints", (1, 1)),
            Attr("pool_pads", "ints", (0, 0, 0, 0)),
        ),
    ),
    OpDecl(
        "LutConvPoolQuant",
        "Y = MaxPool([relu](Scale[m] * conv(X - x_zero_point, Codebook[unpack(Codes)]) + "
        "Bias[m])) channels last, Q = ThresholdQuant(Y, QScale, QThresholds): ConvPoolQuant on "
        "uint8 input levels (padding is level x_zero_point) with codebook weights.",
        (*_LUT_INPUTS, *_QUANT),
        (Param("Y", "float"), Param("Q", "uint8")),
        (
            Attr("bits", "int"),
            Attr("kernel_shape", "ints"),
            Attr("strides", "ints", (1, 1)),
            Attr("pads", "ints", (0, 0, 0, 0)),
            Attr("x_zero_point", "int", 0),
            Attr("relu", "int", 0),
            Attr("pool_kernel_shape", "ints", (1, 1)),
            Attr("pool_strides", "ints", (1, 1)),
            Attr("pool_pads", "ints", (0, 0, 0, 0)),
        ),
    ),
    OpDecl(
        "LutGemm",
        "Y = Scale[m] * X @ Codebook[unpack(Codes)]^T + Bias[m] on uint8 levels X [N, K].",
        _LUT_INPUTS,
        (Param("Y", "float"),),
        (Attr("bits", "int"),),
    ),
)

OPS_BY_NAME = {op.name: op for op in OPS}

_TYPES = {"uint8": "tensor(uint8)", "float": "tensor(float)"}
ELEMENT_TYPES = {"uint8": onnx.TensorProto.UINT8, "float": onnx.TensorProto.FLOAT}
_ATTR_TYPES = {
    "int": onnx.defs.OpSchema.AttrType.INT,
    "ints": onnx.defs.OpSchema.AttrType.INTS,
}

# ----------------------------------------------------------------------------- shape inference
# Called by onnx for each ai.adq node; they never raise (onnx would propagate the error even
# with strict_mode=False): what they cannot tell is left unknown, and the kernels report errors.

InferenceFunction = Callable[[onnx.shape_inference.InferenceContext], None]
_WINDOW = ("kernel_shape", "strides", "pads", "dilations")
Dim = onnx.TensorShapeProto.Dimension | int | None  # a dimension to copy, a value, or unknown


def _input_dims(ctx: onnx.shape_inference.InferenceContext, i: int, rank: int | None = None):
    """Input i's dims (of ``rank`` when given), None when absent or of unknown shape."""
    if i >= ctx.get_num_inputs() or not ctx.has_input(i):
        return None
    t = ctx.get_input_type(i)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = list(t.tensor_type.shape.dim)
    return dims if rank is None or len(dims) == rank else None


def _set_output(
    ctx: onnx.shape_inference.InferenceContext, dtype: str, dims, index: int = 0
) -> None:
    """Output ``index``: element type ``dtype``, shape ``dims`` (a list of Dim; None: unknown
    rank)."""
    t = onnx.TypeProto()
    t.tensor_type.elem_type = ELEMENT_TYPES[dtype]
    if dims is not None:
        shape = t.tensor_type.shape
        shape.SetInParent()  # a rank-0 output still has a shape
        for d in dims:
            new = shape.dim.add()
            if isinstance(d, int):
                new.dim_value = d
            elif d is not None:
                new.CopyFrom(d)
    ctx.set_output_type(index, t)


def _attr(ctx: onnx.shape_inference.InferenceContext, op: str, name: str):
    """An attribute's value, its declared default when absent (None: required and absent)."""
    a = ctx.get_attribute(name)
    return attribute_defaults(op)[name] if a is None else onnx.helper.get_attribute_value(a)


def _conv_out_hw(
    ctx: onnx.shape_inference.InferenceContext, op: str, hw, names=_WINDOW
) -> list[int | None]:
    """OH, OW from the input's H, W dims (Dims or ints) and the window attributes ``names``
    (kernel, strides, pads, dilations or None for 1), where all are known and valid."""
    values = [_attr(ctx, op, n) if n else [1, 1] for n in names]
    lengths = [len(v) if isinstance(v, (list, tuple)) else -1 for v in values]
    k, s, p, d = values
    if lengths != [2, 2, 4, 2] or min(s) < 1:
        return [None, None]
    out: list[int | None] = []
    for i in range(2):
        size_in = (
            hw[i]
            if isinstance(hw[i], int) or hw[i] is None
            else (hw[i].dim_value if hw[i].HasField("dim_value") else None)
        )
        if size_in is None:
            out.append(None)
            continue
        size = (size_in + p[i] + p[i + 2] - d[i] * (k[i] - 1) - 1) // s[i] + 1
        out.append(size if size >= 1 else None)
    return out


def _infer_threshold_quant(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Q: uint8 of X's shape."""
    _set_output(ctx, "uint8", _input_dims(ctx, 0))


def _infer_lut_dequant(ctx: onnx.shape_inference.InferenceContext) -> None:
    """W: float of the ``shape`` attribute."""
    shape = _attr(ctx, "LutDequant", "shape")
    dims = [v if v > 0 else None for v in shape] if isinstance(shape, list) else None
    _set_output(ctx, "float", dims)


def _infer_lut_conv(ctx: onnx.shape_inference.InferenceContext, op: str) -> None:
    """Each listed output [N, M, OH, OW] ([N, OH, OW, M] with channels_last; element types as
    declared), with N from X, M = Codes.shape[0], OH / OW from the attributes."""
    dtypes = [p.dtype for p in OPS_BY_NAME[op].outputs]
    x, codes = _input_dims(ctx, 0, 4), _input_dims(ctx, 1, 2)
    last = _attr(ctx, op, "channels_last") == 1
    dims: list[Dim] = [None] * 4
    if x is not None:
        dims[0], dims[2:] = x[0], _conv_out_hw(ctx, op, x[1:3] if last else x[2:])
    if codes is not None:
        dims[1] = codes[0]
    if last:
        dims = [dims[0], dims[2], dims[3], dims[1]]
    for index, dtype in enumerate(dtypes[: ctx.get_num_outputs()]):
        _set_output(ctx, dtype, dims, index)


def _infer_conv_pool_quant(
    ctx: onnx.shape_inference.InferenceContext, op: str = "ConvPoolQuant"
) -> None:
    """Y (float) and Q (uint8): [N, PH, PW, M], N from X, M = W.shape[0] (LutConvPoolQuant:
    Codes.shape[0]), PH / PW through the convolution and the pooling window."""
    x, w = _input_dims(ctx, 0, 4), _input_dims(ctx, 1, 4 if op == "ConvPoolQuant" else 2)
    hw: list[int | None] = [None, None]
    if x is not None:
        hw = _conv_out_hw(ctx, op, x[2:], ("kernel_shape", "strides", "pads", None))
        hw = _conv_out_hw(ctx, op, hw, ("pool_kernel_shape", "pool_strides", "pool_pads", None))
    dims: list[Dim] = [x and x[0], *hw, w and w[0]]
    for index, p in enumerate(OPS_BY_NAME[op].outputs[: ctx.get_num_outputs()]):
        _set_output(ctx, p.dtype, dims, index)


def _infer_lut_gemm(ctx: onnx.shape_inference.InferenceContext) -> None:
    """Y: float [N, M], N from X, M = Codes.shape[0]."""
    x, codes = _input_dims(ctx, 0, 2), _input_dims(ctx, 1, 2)
    _set_output(ctx, "float", [x and x[0], codes and codes[0]])


_INFERENCE: dict[str, InferenceFunction] = {
    "ThresholdQuant": _infer_threshold_quant,
    "LutDequant": _infer_lut_dequant,
    "LutConv": partial(_infer_lut_conv, op="LutConv"),
    "LutConvQuant": partial(_infer_lut_conv, op="LutConvQuant"),
    "LutGemm": _infer_lut_gemm,
    "ConvPoolQuant": _infer_conv_pool_quant,
    "LutConvPoolQuant": partial(_infer_conv_pool_quant, op="LutConvPoolQuant"),
}


def onnx_schema(op: OpDecl) -> onnx.defs.OpSchema:
    """The onnx.defs.OpSchema of a declaration (for onnx.checker and shape inference)."""
    S = onnx.defs.OpSchema
    params = []
    constraints = []
    for io in ("in", "out"):
        for p in op.inputs if io == "in" else op.outputs:
            type_str = f"T_{io}_{p.name}"
            option = (
                S.FormalParameterOption.Optional if p.optional else S.FormalParameterOption.Single
            )
            params.append((io, S.FormalParameter(p.name, type_str, param_option=option)))
            constraints.append((type_str, [_TYPES[p.dtype]], f"{p.name} is {p.dtype}"))
    attrs = []
    for a in op.attrs:
        if a.default is None:
            attrs.append(S.Attribute(a.name, _ATTR_TYPES[a.kind], "", required=True))
        else:
            value = list(a.default) if isinstance(a.default, tuple) else a.default
            name = a.name
            attrs.append(S.Attribute(name, onnx.helper.make_attribute(name, value), ""))
    schema = S(
        op.name,
        DOMAIN,
        VERSION,
        op.doc,
        inputs=[p for io, p in params if io == "in"],
        outputs=[p for io, p in params if io == "out"],
        type_constraints=constraints,
        attributes=attrs,
    )
    schema.set_type_and_shape_inference_function(_INFERENCE[op.name])
    return schema


def is_registered(op: OpDecl) -> bool:
    """Whether onnx's registry holds an ai.adq op's schema."""
    try:
        onnx.defs.get_schema(op.name, VERSION, DOMAIN)
    except onnx.defs.SchemaError:
        return False
    return True


def register_onnx_schemas() -> None:
    """Register the ai.adq schemas with onnx (idempotent) so onnx.checker and shape inference
    know the ops; they are removed again at interpreter exit (see deregister_onnx_schemas)."""
    missing = [op for op in OPS if not is_registered(op)]
    for op in missing:
        onnx.defs.register_schema(onnx_schema(op))
    if missing:
        atexit.register(deregister_onnx_schemas)


def deregister_onnx_schemas() -> None:
    """Remove the ai.adq schemas from onnx's registry (a no-op for those not registered).

    Their inference functions are Python objects held by onnx's C++ registry. Left there, onnx
    1.19 to 1.22 destroy them after the interpreter has finalized, at process exit: 1.19 hangs
    waiting for the GIL and 1.20-1.22 crash (exit status 139), so every command would fail.
    """
    for op in OPS:
        if is_registered(op):
            onnx.defs.deregister_schema(op.name, VERSION, DOMAIN)
    atexit.unregister(deregister_onnx_schemas)


def attribute_defaults(op_name: str) -> dict[str, int | tuple[int, ...] | None]:
    """Attribute name -> default (None = required) of an op."""
    return {a.name: a.default for a in OPS_BY_NAME[op_name].attrs}
