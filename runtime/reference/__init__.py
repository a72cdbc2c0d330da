"""NumPy reference implementations of the ai.adq ops, in the style of ``onnx.reference``.

One ``OpRun`` subclass per op (``op_<name>.py``), all listed in ``ALL_OPS`` so that
``evaluator(model)`` (a ``ReferenceEvaluator`` with ``new_ops=list(ALL_OPS)``) runs any exported
graph without the C++ library.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from runtime.reference.op_conv_pool_quant import ConvPoolQuant
from runtime.reference.op_lut_conv import LutConv
from runtime.reference.op_lut_conv_pool_quant import LutConvPoolQuant
from runtime.reference.op_lut_conv_quant import LutConvQuant
from runtime.reference.op_lut_dequant import LutDequant
from runtime.reference.op_lut_gemm import LutGemm
from runtime.reference.op_threshold_quant import ThresholdQuant

ALL_OPS = [
    ThresholdQuant,
    LutDequant,
    LutConv,
    LutConvQuant,
    ConvPoolQuant,
    LutConvPoolQuant,
    LutGemm,
]


def evaluator(model_or_path: onnx.ModelProto | str | os.PathLike) -> ReferenceEvaluator:
    """A ``ReferenceEvaluator`` that knows the ai.adq ops."""
    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = onnx.load(os.fspath(model_or_path))
    # A copy: onnx 1.20-1.22 append their optimized Conv to the list they are given.
    return ReferenceEvaluator(model_or_path, new_ops=list(ALL_OPS))


def run_reference(
    model_or_path: onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray]
) -> list[np.ndarray]:
    """Run a model (ai.adq ops included) on NumPy feeds; the outputs in graph order."""
    return list(evaluator(model_or_path).run(None, feeds))


__all__ = [
    "ALL_OPS",
    "ConvPoolQuant",
    "LutConv",
    "LutConvPoolQuant",
    "LutConvQuant",
    "LutDequant",
    "LutGemm",
    "ThresholdQuant",
    "evaluator",
    "run_reference",
]
