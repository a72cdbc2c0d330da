"""QuantConfig: every choice quantize_model makes, validated, versioned, round-trippable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .activation import ACT_KINDS
from .codebook import FORMS, INITS

CONFIG_VERSION = 1


@dataclass
class QuantConfig:
    """How to quantize a model. `QuantConfig()` is W4A4 ADQ with the first and last layer in float.

    w_bits / a_bits: default weight / activation bits of quantized layers; `layer_bits` and
    `layer_a_bits` override them per layer name (what bit allocation fills in).
    w_form: 'full' (2^b levels, zero included) or 'symmetric' (2^b - 1 levels, zero in the middle).
    w_init: codebook initialization 'quantile' | 'uniform' | 'kmeans'; ema / ema_beta: EMA
    adaptation of the codebook; clip_grad: zero weight gradients outside [C_min, C_max].
    act: activation quantizer 'n2uq' | 'lsq' | 'none' (weights only).
    skip_first / skip_last: keep the first and the last quantizable layer (module registration
    order) out of the low-bit scheme; edge_bits None keeps them in float, 8 quantizes them at
    W8A8. input_bits 8 (with edge_bits 8) also quantizes the first layer's input, the network
    input, onto 8-bit levels with a zero point (InputQuant), so that the first layer runs in
    integers too; None keeps that input in float. skip: fnmatch patterns of further layer
    names to keep in float.
    """

    w_bits: int = 4
    a_bits: int = 4
    w_form: str = "full"
    w_init: str = "quantile"
    ema: bool = True
    ema_beta: float = 0.99
    clip_grad: bool = False
    act: str = "n2uq"
    skip_first: bool = True
    skip_last: bool = True
    edge_bits: int | None = None
    input_bits: int | None = None
    skip: tuple[str, ...] = ()
    layer_bits: dict[str, int] = field(default_factory=dict)
    layer_a_bits: dict[str, int] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.skip = tuple(self.skip)
        self.layer_bits = {str(k): int(v) for k, v in self.layer_bits.items()}
        self.layer_a_bits = {str(k): int(v) for k, v in self.layer_a_bits.items()}
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"unsupported QuantConfig version {self.version} (expected {CONFIG_VERSION})"
            )
        for name, b in [("w_bits", self.w_bits), *self.layer_bits.items()]:
            if not 2 <= b <= 8:
                raise ValueError(f"weight bits must be in 2..8, got {b} for {name}")
        for name, b in [("a_bits", self.a_bits), *self.layer_a_bits.items()]:
            if not 1 <= b <= 8:
                raise ValueError(f"activation bits must be in 1..8, got {b} for {name}")
        if self.w_form not in FORMS:
            raise ValueError(f"w_form must be one of {FORMS}, got {self.w_form!r}")
        if self.w_init not in INITS:
            raise ValueError(f"w_init must be one of {INITS}, got {self.w_init!r}")
        if self.act not in (*ACT_KINDS, "none"):
            raise ValueError(f"act must be one of {(*ACT_KINDS, 'none')}, got {self.act!r}")
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.edge_bits not in (None, 8):
            raise ValueError(f"edge_bits must be None (float) or 8, got {self.edge_bits}")
        if self.input_bits not in (None, 8):
            raise ValueError(f"input_bits must be None (float) or 8, got {self.input_bits}")
        if self.input_bits is not None and (self.edge_bits is None or not self.skip_first):
            raise ValueError("input_bits needs edge_bits=8 and skip_first (an 8-bit first layer)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (str, int, float, bool, list, dict) for checkpoints and JSON."""
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Inverse of to_dict; unknown keys are an error rather than silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
