"""The ai.adq op set, declared once: names, inputs, outputs, attributes (docs/onnx-ops.md).

The exporter, the NumPy references, the tests and onnx.checker (through registered
onnx.defs.OpSchema objects) all read these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx.defs

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
        "Y = Scale[m] * conv(X, Codebook[unpack(Codes)]) + Bias[m] on uint8 levels X.",
        _LUT_INPUTS,
        (Param("Y", "float"),),
        (
            Attr("bits", "int"),
            Attr("kernel_shape", "ints"),
            Attr("strides", "ints", (1, 1)),
            Attr("pads", "ints", (0, 0, 0, 0)),
            Attr("dilations", "ints", (1, 1)),
            Attr("group", "int", 1),
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
_ATTR_TYPES = {
    "int": onnx.defs.OpSchema.AttrType.INT,
    "ints": onnx.defs.OpSchema.AttrType.INTS,
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
    return S(
        op.name,
        DOMAIN,
        VERSION,
        op.doc,
        inputs=[p for io, p in params if io == "in"],
        outputs=[p for io, p in params if io == "out"],
        type_constraints=constraints,
        attributes=attrs,
    )


def register_onnx_schemas() -> None:
    """Register the ai.adq schemas with onnx (idempotent) so onnx.checker knows the ops."""
    for op in OPS:
        try:
            onnx.defs.get_schema(op.name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(onnx_schema(op))


def attribute_defaults(op_name: str) -> dict[str, int | tuple[int, ...] | None]:
    """Attribute name -> default (None = required) of an op."""
    return {a.name: a.default for a in OPS_BY_NAME[op_name].attrs}
