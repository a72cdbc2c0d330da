"""adq-export: checkpoint -> folded layers -> one writer -> checked, simplified, saved ONNX."""

from __future__ import annotations

import copy
import io
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import helper

from adq_deploy.atomic import atomic_write
from adq_deploy.checkpoint import Checkpoint, load_checkpoint
from runtime.schema import register_onnx_schemas

from .fold import FoldedModel, fold
from .graph import compact_names
from .write_adq import write_adq
from .write_int8 import snapping_report, write_int8
from .write_standard import DEFAULT_OPSET, MIN_OPSET, write_standard

FORMATS = ("adq", "standard", "int8")


@dataclass
class ExportResult:
    """What adq-export wrote and how it compares with the fp32 ONNX of the same network."""

    path: Path
    format: str
    size_bytes: int
    fp32_size_bytes: int
    folded: FoldedModel
    seconds: float

    def summary(self) -> str:
        """The table adq-export prints: layers, bits, and the size against fp32."""
        lines = [f"{'layer':<24} {'kind':<5} {'w_bits':>6} {'a_bits':>6} {'bn folded':>9}"]
        for name, lay in self.folded.layers.items():
            a = "fp32" if lay.act is None else str(lay.act.bits)
            lines.append(
                f"{name:<24} {lay.kind:<5} {lay.bits:>6} {a:>6} "
                f"{'yes' if lay.bn_folded else 'no':>9}"
            )
        meta = self.folded.metadata
        ratio = self.size_bytes / self.fp32_size_bytes
        lines.append(
            f"average weight bits {meta['avg_bits_param_weighted']:.3f} (parameter-weighted), "
            f"{meta['avg_bits_layer_mean']:.3f} (layer mean); excluded: "
            + (", ".join(meta["avg_bits_excluded"]) or "none")
        )
        lines.append(
            f"wrote {self.path} ({self.format}): {self.size_bytes:,} bytes = {ratio:.3f} x the "
            f"fp32 ONNX ({self.fp32_size_bytes:,} bytes) in {self.seconds:.1f} s"
        )
        return "\n".join(lines)


def fp32_onnx(checkpoint: Checkpoint, allow_import: bool = False) -> onnx.ModelProto:
    """The float network with the same (float) weights, exported plainly: the size baseline."""
    from adq_deploy.models import build

    model = build(checkpoint.architecture, allow_import=allow_import).eval()
    float_state = {k: v for k, v in checkpoint.raw["state_dict"].items() if k in model.state_dict()}
    model.load_state_dict(float_state)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, *checkpoint.input["shape"]),),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=20,
        )
    return onnx.load_from_string(buf.getvalue())


PROTECTED_SUFFIXES = (".codes", ".weight_int8", ".weight_int8_t")


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim, with the low-bit weight tensors hidden from its constant folding.

    onnxsim folds Cast + Gather on codes back into float weights (undoing the compression),
    even with mutable_initializer=True; graph inputs are never folded, so the codes travel
    through it as inputs and come back as initializers.
    """
    import onnxsim

    model = copy.deepcopy(model)
    graph = model.graph
    hidden = [i for i in graph.initializer if i.name.endswith(PROTECTED_SUFFIXES)]
    for init in hidden:
        graph.initializer.remove(init)
        graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as e:  # onnxsim raises bare RuntimeErrors, messages of many lines
        import onnxruntime

        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ValueError(
            f"onnxsim {onnxsim.__version__} failed (onnxruntime {onnxruntime.__version__}): "
            f"{first.strip()}; export with --no-simplify (onnxsim 0.8 needs onnxruntime >= 1.24)"
        ) from e
    if not ok:
        raise ValueError("onnxsim could not validate the simplified model (use --no-simplify)")
    names = {i.name for i in hidden}
    kept = [i for i in simplified.graph.input if i.name not in names]
    del simplified.graph.input[:]
    simplified.graph.input.extend(kept)
    used = {i for n in simplified.graph.node for i in n.input}
    simplified.graph.initializer.extend(i for i in hidden if i.name in used)
    return simplified


def write(model: onnx.ModelProto, path: Path) -> int:
    """Save atomically (temporary file beside the target, then rename); returns the size."""
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def _check_writable(path: Path) -> None:
    """Fail before the work, with one line, when the output cannot be written."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    if path.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: not a writable file location")


def check_format(
    fmt: str, opset: int | None, int_codebooks: bool = False, nchw: bool = False
) -> None:
    """Reject an unknown format, --opset with adq / int8, too old an opset for standard,
    --int-codebooks with another format than adq, or --nchw without --int-codebooks."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if int_codebooks and fmt != "adq":
        raise ValueError("--int-codebooks applies to the adq format only")
    if nchw and not int_codebooks:
        raise ValueError("--nchw applies to --int-codebooks only (the other graphs are NCHW)")
    if opset is not None and fmt != "standard":
        raise ValueError("--opset applies to the standard format only")
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(
            f"--opset {opset} is too old for the standard format (needs >= {MIN_OPSET})"
        )


def build_model(
    folded: FoldedModel,
    fmt: str,
    opset: int | None = None,
    int_codebooks: bool = False,
    nchw: bool = False,
) -> onnx.ModelProto:
    """Run the writer of a format on the folded model."""
    check_format(fmt, opset, int_codebooks, nchw)
    if fmt == "adq":
        return write_adq(folded, int_codebooks, channels_last=not nchw)
    if fmt == "standard":
        return write_standard(folded, DEFAULT_OPSET if opset is None else opset)
    return write_int8(folded)


def export(
    checkpoint: str | Path,
    out: str | Path | None = None,
    fmt: str = "adq",
    opset: int | None = None,
    simplify_graph: bool = True,
    allow_import: bool = False,
    int_codebooks: bool = False,
    nchw: bool = False,
) -> ExportResult:
    """The whole adq-export: returns what was written."""
    check_format(fmt, opset, int_codebooks, nchw)  # before loading: fail fast
    start = time.perf_counter()
    checkpoint = Path(checkpoint)
    out = Path(out) if out else checkpoint.with_suffix(f".{fmt}.onnx")
    _check_writable(out)
    ck = load_checkpoint(checkpoint, allow_import=allow_import)
    folded = fold(ck)
    model = build_model(folded, fmt, opset, int_codebooks, nchw)
    if simplify_graph and fmt != "adq":
        model = simplify(model)
        compact_names(model)  # onnxsim adds value_info back
    register_onnx_schemas()
    try:
        onnx.checker.check_model(model, full_check=fmt != "adq")
    except onnx.checker.ValidationError as e:  # not a ValueError: would be a CLI traceback
        first = (str(e).strip().splitlines() or ["invalid model"])[0]
        raise ValueError(f"the exported {fmt} graph is not valid ONNX: {first}") from None
    size = write(model, out)
    fp32_size = len(fp32_onnx(ck, allow_import).SerializeToString())
    return ExportResult(out, fmt, size, fp32_size, folded, time.perf_counter() - start)


__all__ = ["FORMATS", "ExportResult", "export", "snapping_report"]
