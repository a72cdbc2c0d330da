"""adq-deploy: train, fold, export and run ADQ mixed-precision quantized networks."""

__version__ = "0.1.0"

from . import models  # noqa: E402
from .allocation import allocate_bits, layer_sensitivity  # noqa: E402
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
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
    "Checkpoint",
    "CheckpointError",
    "QuantConfig",
    "__version__",
    "allocate_bits",
    "average_bits",
    "layer_sensitivity",
    "layer_table",
    "load_checkpoint",
    "models",
    "quantize_model",
    "save_checkpoint",
    "summary",
]
