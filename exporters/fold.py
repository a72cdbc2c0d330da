"""Fold a checkpoint into deployable tensors: the single input of every ONNX writer.

Per ADQ layer: integer weight codes and the codebook, the input quantizer as a scale plus
sorted thresholds onto uint8 levels and the value of one level, and an output affine
(per-channel scale and bias) into which the layer bias and a following batch norm are folded.
Around the layers: the float skeleton graph (exporters/skeleton.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper

from adq_deploy.checkpoint import Checkpoint
from adq_deploy.quant import LSQ, N2UQ, InputQuant, QuantConv2d, QuantLayerMixin, assign
from adq_deploy.quant.apply import average_bits

from .graph import constant_value, consumers, remove_unused
from .skeleton import PLACEHOLDER, export_skeleton


@dataclass
class FoldedInput:
    """Input quantizer: level q = #{i : scale * x >= thresholds[i]}, value (q - zero_point) * step.

    zero_point is 0 but for a quantized network input (InputQuant), whose zero padding is level
    zero_point."""

    kind: str
    bits: int
    scale: np.ndarray  # float32 scalar
    thresholds: np.ndarray  # float32 [L-1], non-decreasing
    step: np.ndarray  # float32 scalar
    zero_point: int = 0


@dataclass
class FoldedLayer:
    """One ADQ layer as deployable tensors: y = out_scale * op(x, codebook[codes]) + out_bias.

    With an input quantizer, op works on integer levels and the level value `step` is part of
    `out_scale`: y = (step * out_scale) * sum(q * W) + out_bias.
    """

    name: str
    kind: str  # "conv" or "gemm"
    role: str
    bits: int
    codes: np.ndarray  # int64, weight shape [M, ...]
    codebook: np.ndarray  # float32 [K]
    act: FoldedInput | None
    out_scale: np.ndarray  # float32 [M]
    out_bias: np.ndarray  # float32 [M]
    conv: dict[str, list[int] | int] = field(default_factory=dict)
    bn_folded: bool = False

    @property
    def weight(self) -> np.ndarray:
        """The quantized float weight, codebook[codes]."""
        return self.codebook[self.codes]

    @property
    def out_channels(self) -> int:
        return int(self.codes.shape[0])


@dataclass
class FoldedModel:
    """Everything a writer needs: the skeleton graph, the folded layers and the metadata."""

    skeleton: onnx.ModelProto
    layers: dict[str, FoldedLayer]
    metadata: dict[str, Any]


def fold_input(quant: torch.nn.Module | None) -> FoldedInput | None:
    """N2UQ -> (alpha1, T_i, alpha2 * 2/(L-1)); LSQ -> (1/s, i - 1/2, s) (ties: see docs);
    InputQuant -> (1/s, i - z - 1/2, s, z)."""
    if quant is None:
        return None
    with torch.no_grad():
        if isinstance(quant, N2UQ):
            return FoldedInput(
                "n2uq",
                quant.bits,
                quant.scale_in().float().numpy().astype(np.float32),
                quant.thresholds().float().numpy().astype(np.float32),
                quant.step().float().numpy().astype(np.float32),
            )
        if isinstance(quant, LSQ):
            s = quant.step().float()
            levels = np.arange(1, quant.levels, dtype=np.float32) - np.float32(0.5)
            return FoldedInput(
                "lsq",
                quant.bits,
                (1.0 / s).numpy().astype(np.float32),
                levels,
                s.numpy().astype(np.float32),
            )
        if isinstance(quant, InputQuant):
            if not bool(quant.initialized):
                raise ValueError(
                    "the network input's quantizer was never calibrated (its range comes from "
                    "the first training batch): train, or run one batch in train mode, first"
                )
            return FoldedInput(
                "input",
                quant.bits,
                quant.scale_in().numpy().astype(np.float32),
                quant.thresholds().numpy().astype(np.float32),
                quant.step().float().numpy().astype(np.float32),
                int(quant.zero_point),
            )
    raise ValueError(f"unsupported activation quantizer {type(quant).__name__}")


def fold_layer(name: str, layer: QuantLayerMixin) -> FoldedLayer:
    """Codes, codebook, input quantizer and bias of one ADQ layer."""
    with torch.no_grad():
        codebook = layer.weight_quant.codebook.float()
        codes = assign(layer.weight.detach().float(), codebook)
        m = layer.weight.shape[0]
        bias = layer.bias.detach().float().numpy() if layer.bias is not None else np.zeros(m)
    conv: dict[str, list[int] | int] = {}
    if isinstance(layer, QuantConv2d):
        if isinstance(layer.padding, str):
            raise ValueError(f"layer {name}: string padding {layer.padding!r} is not supported")
        conv = {
            "kernel_shape": list(layer.kernel_size),
            "strides": list(layer.stride),
            "pads": [layer.padding[0], layer.padding[1], layer.padding[0], layer.padding[1]],
            "dilations": list(layer.dilation),
            "group": int(layer.groups),
        }
    return FoldedLayer(
        name=name,
        kind="conv" if conv else "gemm",
        role=layer.role,
        bits=layer.w_bits,
        codes=codes.numpy().astype(np.int64),
        codebook=codebook.numpy().astype(np.float32),
        act=fold_input(layer.act_quant),
        out_scale=np.ones(m, dtype=np.float32),
        out_bias=bias.astype(np.float32),
        conv=conv,
    )


def absorb_batch_norms(model: onnx.ModelProto, layers: dict[str, FoldedLayer]) -> None:
    """Fold a BatchNormalization that only follows a placeholder into the layer's affine.

    Exact in real arithmetic: y = s * (out_scale * acc + out_bias) + t per channel.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == PLACEHOLDER]:
        layer = layers[placeholder_name(node)]
        users = consumers(graph, node.output[0])
        if len(users) != 1 or users[0].op_type != "BatchNormalization" or node.output[0] in outputs:
            continue
        bn = users[0]
        params = [constant_value(graph, i) for i in bn.input[1:5]]
        if any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = gamma / np.sqrt(var + eps)
        layer.out_scale = (layer.out_scale * s).astype(np.float32)
        layer.out_bias = (layer.out_bias * s + beta - mean * s).astype(np.float32)
        layer.bn_folded = True
        node.output[0] = bn.output[0]
        graph.node.remove(bn)
    remove_unused(graph)


def placeholder_name(node: onnx.NodeProto) -> str:
    """The ADQ layer name a placeholder node stands for."""
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == "name")).decode()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, for the provenance metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fold(checkpoint: Checkpoint) -> FoldedModel:
    """The folded form of a loaded checkpoint (the model must be quantized)."""
    model = checkpoint.model.eval()
    layers = {
        name: fold_layer(name, m)
        for name, m in model.named_modules()
        if isinstance(m, QuantLayerMixin)
    }
    if not layers:
        raise ValueError("the checkpoint holds no ADQ layers (a float model): nothing to fold")
    skeleton = export_skeleton(model, checkpoint.input["shape"])
    calls = Counter(placeholder_name(n) for n in skeleton.graph.node if n.op_type == PLACEHOLDER)
    for name, count in calls.items():
        if count > 1:  # one set of tensors, several call sites: BN folding would mix them up
            raise ValueError(
                f"layer {name} runs {count} times in one forward pass (a shared layer); "
                "the exporter supports each ADQ layer called once"
            )
    absorb_batch_norms(skeleton, layers)
    avg = average_bits(model)
    metadata = {
        "input_shape": list(checkpoint.input["shape"]),
        "mean": checkpoint.input.get("mean"),
        "std": checkpoint.input.get("std"),
        "class_names": checkpoint.class_names,
        "avg_bits_param_weighted": avg.param_weighted,
        "avg_bits_layer_mean": avg.layer_mean,
        "avg_bits_excluded": avg.excluded,
        "layer_bits": {
            n: {"w_bits": lay.bits, "a_bits": None if lay.act is None else lay.act.bits}
            for n, lay in layers.items()
        },
        "checkpoint_sha256": file_sha256(checkpoint.path) if checkpoint.path else None,
    }
    return FoldedModel(skeleton=skeleton, layers=layers, metadata=metadata)
