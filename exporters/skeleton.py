"""Export the network around its ADQ layers: an ONNX graph where each ADQ layer is one placeholder.

Every QuantConv2d / QuantLinear becomes a node `ai.adq::QuantLayer(x) {name}`; everything else
(float layers with their batch norm fused by the exporter, pooling, residual adds, ...) is
ordinary ONNX. Each writer then replaces the placeholders with its own form of the layer.

Why this route (docs/export.md): the TorchScript exporter (dynamo=False) maps an
autograd.Function to a custom node through `symbolic`; the dynamo exporter's custom-domain
translation failed in its inliner with torch 2.13. Tracing runs the real quantized layer, so
the traced values are exactly the PyTorch model's.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

import onnx
import torch
from torch import nn

from adq_deploy.quant import QuantLayerMixin

PLACEHOLDER = "QuantLayer"
DOMAIN = "ai.adq"
SKELETON_OPSET = 20


class _Placeholder(torch.autograd.Function):
    """Forward: the ADQ layer's own output; symbolic: one ai.adq::QuantLayer node on x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:  # type: ignore[override]
        return y.clone()

    @staticmethod
    def symbolic(g, x, y, name):  # type: ignore[override]
        out = g.op(f"{DOMAIN}::{PLACEHOLDER}", x, name_s=name)
        out.setType(y.type())
        return out


class _PlaceholderLayer(nn.Module):
    """Wraps an ADQ layer so that tracing records it as a single placeholder node."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        self.layer_name = name
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The layer's ops are traced, then dropped as dead code: only x feeds the placeholder.
        return _Placeholder.apply(x, self.layer(x), self.layer_name)


def with_placeholders(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of the model whose ADQ layers are wrapped as placeholders, and their names."""
    model = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _PlaceholderLayer(name, getattr(parent, child)))
    return model, names


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Hold back what C++ prints on stderr while tracing; replay it only if the export fails.

    Tracing the ADQ layers' internals (searchsorted, bucketize, ...) makes the TorchScript
    exporter print hundreds of warnings about ops it then drops as dead code.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def export_skeleton(
    model: nn.Module, input_shape: list[int] | tuple[int, ...], batch: int = 1
) -> onnx.ModelProto:
    """ONNX float graph of the model (dynamic batch) with one placeholder per ADQ layer."""
    wrapped, _ = with_placeholders(model)
    example = torch.zeros(batch, *input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _quiet_native_stderr():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapped,
            (example,),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=SKELETON_OPSET,
            custom_opsets={DOMAIN: 1},
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())
