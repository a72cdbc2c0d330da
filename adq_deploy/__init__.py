"""adq-deploy: train, fold, export and run ADQ mixed-precision quantized networks."""

__version__ = "0.1.0"

from .quant import (  # noqa: E402
    AverageBits,
    QuantConfig,
    average_bits,
    layer_table,
    quantize_model,
    summary,
)

__all__ = [
    "AverageBits",
    "QuantConfig",
    "__version__",
    "average_bits",
    "layer_table",
    "quantize_model",
    "summary",
]
