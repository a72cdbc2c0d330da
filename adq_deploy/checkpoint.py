"""Checkpoint format v1: a plain dict that torch.load(weights_only=True) can read."""

from __future__ import annotations

import datetime as _dt
import os
import pickle
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import atomic_write
from .models import ArchitectureError, architecture_of, build
from .quant import QuantConfig, layer_table, quantize_model
from .quant.apply import average_bits
from .quant.layers import QuantLayerMixin

FORMAT_NAME = "adq-checkpoint"
FORMAT_VERSION = 1
REQUIRED = {
    "format": str,
    "version": int,
    "architecture": dict,
    "quant_config": (dict, type(None)),
    "layers": dict,
    "state_dict": dict,
    "input": dict,
    "class_names": (list, type(None)),
    "metrics": dict,
    "provenance": dict,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or trusted; the message is one line meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and everything recorded beside it."""

    model: nn.Module
    architecture: dict[str, Any]
    quant_config: QuantConfig | None
    layers: dict[str, dict[str, Any]]
    input: dict[str, Any]
    class_names: list[str] | None
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _plain(value: Any, where: str) -> Any:
    """Metadata as plain data (str, int, float, bool, None, list, dict), as weights_only needs."""
    # Subclasses (torch's TorchVersion is a str) would be pickled as classes: store the base type.
    if value is None or type(value) in (str, bool, int, float):
        return value
    for base in (bool, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"{where}: {type(value).__name__} is not plain data (str/int/float/bool/list/dict)"
    )


def layer_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer quantization settings of every Conv2d / Linear (w_bits None = float)."""
    modules = dict(model.named_modules())
    out = {}
    for row in layer_table(model):
        m = modules[row.name]
        entry = {
            "kind": row.kind,
            "params": row.params,
            "role": row.role,
            "w_bits": row.w_bits,
            "a_bits": row.a_bits,
            "w_form": None,
            "w_init": None,
            "act": None,
        }
        if isinstance(m, QuantLayerMixin):
            entry["w_form"] = m.weight_quant.form
            entry["w_init"] = m.weight_quant.init
            entry["act"] = None if m.act_quant is None else type(m.act_quant).__name__.lower()
        out[row.name] = entry
    return out


def provenance(command: str | None = None, train_args: dict | None = None) -> dict[str, Any]:
    """Versions, time and how the checkpoint was made."""
    return {
        "adq_deploy": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "train_args": train_args or {},
    }


def checkpoint_dict(
    model: nn.Module,
    *,
    input_shape: tuple[int, ...] | list[int],
    mean: list[float] | None = None,
    std: list[float] | None = None,
    class_names: list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    architecture: dict[str, Any] | None = None,
    command: str | None = None,
    train_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The v1 dict for a model; average bits (both definitions) are added to the metrics."""
    architecture = architecture or architecture_of(model)
    if architecture is None:
        raise ValueError(
            "the model does not say how to rebuild it: build it with adq_deploy.models.get(...) "
            "or pass architecture={'name': ..., 'kwargs': {...}}"
        )
    config = getattr(model, "adq_config", None)
    metrics = dict(metrics or {})
    if config is not None:
        avg = average_bits(model)
        metrics.setdefault("avg_bits_param_weighted", avg.param_weighted)
        metrics.setdefault("avg_bits_layer_mean", avg.layer_mean)
        metrics.setdefault("avg_bits_excluded", dict(avg.excluded))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "architecture": _plain(architecture, "architecture"),
        "quant_config": None if config is None else _plain(config.to_dict(), "quant_config"),
        "layers": _plain(layer_settings(model), "layers"),
        "state_dict": state,
        "input": {
            "shape": [int(s) for s in input_shape],
            "mean": None if mean is None else [float(v) for v in mean],
            "std": None if std is None else [float(v) for v in std],
        },
        "class_names": None if class_names is None else [str(c) for c in class_names],
        "metrics": _plain(metrics, "metrics"),
        "provenance": _plain(provenance(command, train_args), "provenance"),
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file beside `path`, then rename: readers never see half a file."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write a v1 checkpoint atomically; metadata as in checkpoint_dict (input_shape required)."""
    return atomic_torch_save(checkpoint_dict(model, **metadata), path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the raw v1 dict without building a model; CheckpointError on problems."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the class or function it refused to load.
        if "unsupported global" in str(e).lower() or "GLOBAL" in str(e):
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects outside the safe "
                "weights-only set (possibly code); nothing in it was run"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, or truncated/corrupt (unpickling failed)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint, or truncated/corrupt ({_first_line(e)})"
        ) from None
    validate(raw, str(path))
    return raw


def validate(raw: Any, where: str = "checkpoint") -> None:
    """Check the v1 schema: format name, version, required keys and their types."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{where}: not an adq-deploy checkpoint (no format '{FORMAT_NAME}')")
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: checkpoint version is missing or not an integer")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: unsupported checkpoint version {version}; adq-deploy {__version__} reads "
            f"version {FORMAT_VERSION}"
        )
    for key, kind in REQUIRED.items():
        if key not in raw:
            raise CheckpointError(f"{where}: malformed checkpoint: missing key '{key}'")
        if not isinstance(raw[key], kind):
            raise CheckpointError(f"{where}: malformed checkpoint: '{key}' has the wrong type")
    bad = [
        k for k, v in raw["state_dict"].items() if not isinstance(k, str) or not torch.is_tensor(v)
    ]
    if bad:
        raise CheckpointError(
            f"{where}: malformed checkpoint: state_dict entry {bad[0]!r} is not a tensor"
        )
    shape = raw["input"].get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise CheckpointError(
            f"{where}: malformed checkpoint: input.shape must be a list of positive ints"
        )
    for name, entry in raw["layers"].items():
        if not isinstance(entry, dict) or "w_bits" not in entry or "a_bits" not in entry:
            raise CheckpointError(
                f"{where}: malformed checkpoint: layer entry {name!r} lacks w_bits/a_bits"
            )


def _rebuild_config(raw: dict[str, Any], where: str) -> QuantConfig:
    """The stored QuantConfig, with per-layer bits taken from the authoritative layer table."""
    try:
        config = QuantConfig.from_dict(raw["quant_config"])
        body = {n: e for n, e in raw["layers"].items() if e.get("role") == "body"}
        return config.replace(
            layer_bits={n: e["w_bits"] for n, e in body.items()},
            layer_a_bits={n: e["a_bits"] for n, e in body.items() if e["a_bits"] is not None},
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: malformed quant_config ({_first_line(e)})") from None


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{where}: state_dict does not match the architecture: {'; '.join(parts)}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{where}: state_dict does not match the architecture: {k} has shape "
                f"{tuple(state[k].shape)}, the model expects {tuple(v.shape)}"
            )


def load_checkpoint(path: str | os.PathLike, *, allow_import: bool = False) -> Checkpoint:
    """Read, validate and rebuild a v1 checkpoint; the model is in eval mode and bit-exact.

    An architecture given as 'module:factory' imports that module only when allow_import=True.
    """
    where = str(path)
    raw = read_checkpoint(path)
    try:
        model = build(raw["architecture"], allow_import=allow_import)
    except ArchitectureError as e:
        raise CheckpointError(f"{where}: {e}") from None
    config = None
    if raw["quant_config"] is not None:
        config = _rebuild_config(raw, where)
        try:
            quantize_model(model, config)
        except ValueError as e:
            raise CheckpointError(
                f"{where}: quant settings do not fit the architecture ({e})"
            ) from None
        rebuilt = {n: (e["w_bits"], e["a_bits"]) for n, e in layer_settings(model).items()}
        stored = {n: (e["w_bits"], e["a_bits"]) for n, e in raw["layers"].items()}
        if rebuilt != stored:
            raise CheckpointError(
                f"{where}: per-layer quant settings do not match the rebuilt model"
            )
    _check_state_dict(model, raw["state_dict"], where)
    model.load_state_dict(raw["state_dict"], strict=True)
    model.eval()
    return Checkpoint(
        model=model,
        architecture=raw["architecture"],
        quant_config=config,
        layers=raw["layers"],
        input=raw["input"],
        class_names=raw["class_names"],
        metrics=raw["metrics"],
        provenance=raw["provenance"],
        path=Path(path),
        raw=raw,
    )
