"""ADQ quantizers, layers and the quantize_model verb."""

from .activation import LSQ, N2UQ, InputQuant, make_act_quantizer
from .apply import (
    AverageBits,
    LayerInfo,
    LayerPlan,
    average_bits,
    layer_table,
    plan_layers,
    quantize_model,
    register_handler,
    summary,
)
from .codebook import CodebookQuantizer, assign, codebook_size, init_codebook
from .config import QuantConfig
from .layers import QuantConv2d, QuantLayerMixin, QuantLinear

__all__ = [
    "LSQ",
    "N2UQ",
    "AverageBits",
    "CodebookQuantizer",
    "InputQuant",
    "LayerInfo",
    "LayerPlan",
    "QuantConfig",
    "QuantConv2d",
    "QuantLayerMixin",
    "QuantLinear",
    "assign",
    "average_bits",
    "codebook_size",
    "init_codebook",
    "layer_table",
    "make_act_quantizer",
    "plan_layers",
    "quantize_model",
    "register_handler",
    "summary",
]
