"""quantize_model: one verb that swaps the Conv2d / Linear layers of any nn.Module for ADQ ones."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .activation import InputQuant, make_act_quantizer
from .codebook import CodebookQuantizer
from .config import QuantConfig
from .layers import QuantConv2d, QuantLayerMixin, QuantLinear


@dataclass(frozen=True)
class LayerPlan:
    """What quantize_model will do with one layer: role 'body', 'first', 'last' or 'skip'."""

    name: str
    kind: str
    params: int
    role: str
    w_bits: int | None
    a_bits: int | None


Handler = Callable[[nn.Module, LayerPlan, QuantConfig], nn.Module]
_HANDLERS: dict[type[nn.Module], Handler] = {}


def register_handler(module_type: type[nn.Module]) -> Callable[[Handler], Handler]:
    """Register the function that builds the ADQ replacement of an exact module type."""

    def deco(fn: Handler) -> Handler:
        _HANDLERS[module_type] = fn
        return fn

    return deco


def _quantizers(module: nn.Module, plan: LayerPlan, config: QuantConfig):
    edge = plan.role in ("first", "last")
    wq = CodebookQuantizer(
        plan.w_bits,
        form="full" if edge else config.w_form,
        init="quantile" if edge else config.w_init,
        ema=config.ema,
        beta=config.ema_beta,
        clip_grad=config.clip_grad,
        weight=module.weight,
    )
    if plan.a_bits is None:
        aq = None
    elif plan.role == "first":
        aq = InputQuant(plan.a_bits)
    else:
        aq = make_act_quantizer(config.act, plan.a_bits)
    return wq, aq


@register_handler(nn.Conv2d)
def _conv2d(module: nn.Module, plan: LayerPlan, config: QuantConfig) -> nn.Module:
    return QuantConv2d.from_float(module, *_quantizers(module, plan, config), role=plan.role)


@register_handler(nn.Linear)
def _linear(module: nn.Module, plan: LayerPlan, config: QuantConfig) -> nn.Module:
    return QuantLinear.from_float(module, *_quantizers(module, plan, config), role=plan.role)


def plan_layers(model: nn.Module, config: QuantConfig) -> list[LayerPlan]:
    """Decide, without changing the model, the role and bits of every quantizable layer.

    'First' and 'last' are the first and last layers with a handler in module registration
    order; a model whose execution order differs should name its edge layers in `config.skip`.
    """
    names = [n for n, m in model.named_modules() if type(m) in _HANDLERS]
    if any(isinstance(m, QuantLayerMixin) for m in model.modules()):
        raise ValueError("model is already quantized")
    unknown = sorted((set(config.layer_bits) | set(config.layer_a_bits)) - set(names))
    if unknown:
        raise ValueError(
            f"per-layer bits name layers the model does not have: {', '.join(unknown)}"
        )
    modules = dict(model.named_modules())
    plans = []
    for i, name in enumerate(names):
        m = modules[name]
        params = m.weight.numel()
        kind = type(m).__name__
        role = "body"
        if config.skip_first and i == 0:
            role = "first"
        elif config.skip_last and i == len(names) - 1:
            role = "last"
        if any(fnmatch.fnmatchcase(name, p) for p in config.skip):
            role = "skip"
        if role == "skip" or (role in ("first", "last") and config.edge_bits is None):
            plans.append(LayerPlan(name, kind, params, role, None, None))
            continue
        if role in ("first", "last"):
            # The first layer's input is the network input: float unless input_bits asks.
            if role == "first":
                a_bits = config.input_bits
            else:
                a_bits = None if config.act == "none" else config.edge_bits
            plans.append(LayerPlan(name, kind, params, role, config.edge_bits, a_bits))
            continue
        w_bits = config.layer_bits.get(name, config.w_bits)
        a_bits = None if config.act == "none" else config.layer_a_bits.get(name, config.a_bits)
        plans.append(LayerPlan(name, kind, params, role, w_bits, a_bits))
    not_body = sorted(
        (set(config.layer_bits) | set(config.layer_a_bits))
        - {p.name for p in plans if p.role == "body"}
    )
    if not_body:
        raise ValueError(
            f"per-layer bits name layers that are not low-bit body layers: {', '.join(not_body)}"
        )
    return plans


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Swap every Conv2d / Linear (but skipped ones) for an ADQ layer, in place; returns the model.

    Codebooks are initialized from the current weights. The config is kept on the model as
    `adq_config`, and each layer's role as `adq_roles`, for checkpoints and the summary.
    """
    config = config or QuantConfig()
    plans = plan_layers(model, config)
    for plan in plans:
        if plan.w_bits is None:
            continue
        module = model.get_submodule(plan.name)
        _set_submodule(model, plan.name, _HANDLERS[type(module)](module, plan, config))
    model.adq_config = config
    model.adq_roles = {p.name: p.role for p in plans}
    return model


@dataclass
class LayerInfo:
    """One row of the summary: a quantizable layer, quantized or left in float."""

    name: str
    kind: str
    params: int
    w_bits: int | None
    a_bits: int | None
    role: str


def layer_table(model: nn.Module) -> list[LayerInfo]:
    """Every Conv2d / Linear of a model with its bits (None = float) and role."""
    rows = []
    roles = getattr(model, "adq_roles", {})
    for name, m in model.named_modules():
        if isinstance(m, QuantLayerMixin):
            kind = "Conv2d" if isinstance(m, nn.Conv2d) else "Linear"
            rows.append(LayerInfo(name, kind, m.weight.numel(), m.w_bits, m.a_bits, m.role))
        elif type(m) in _HANDLERS:
            role = roles.get(name, "float")
            rows.append(LayerInfo(name, type(m).__name__, m.weight.numel(), None, None, role))
    return rows


@dataclass
class AverageBits:
    """Average weight bits of the low-bit (body) layers, both definitions, and what was left out."""

    param_weighted: float
    layer_mean: float
    layers: int
    params: int
    excluded: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line that says which definition is which and which layers are excluded."""
        ex = ", ".join(f"{n} ({r})" for n, r in self.excluded.items()) or "none"
        return (
            f"average weight bits {self.param_weighted:.3f} parameter-weighted, "
            f"{self.layer_mean:.3f} per-layer mean, over {self.layers} layers / {self.params} "
            f"weights; excluded: {ex}"
        )


def average_bits(model: nn.Module) -> AverageBits:
    """Parameter-weighted and per-layer mean weight bits of the low-bit body layers."""
    rows = layer_table(model)
    body = [r for r in rows if r.role == "body"]
    excluded = {
        r.name: (f"float, {r.role}" if r.w_bits is None else f"W{r.w_bits}, {r.role}")
        for r in rows
        if r.role != "body"
    }
    if not body:
        return AverageBits(float("nan"), float("nan"), 0, 0, excluded)
    params = sum(r.params for r in body)
    pw = sum(r.params * r.w_bits for r in body) / params
    lm = sum(r.w_bits for r in body) / len(body)
    return AverageBits(pw, lm, len(body), params, excluded)


def summary(model: nn.Module) -> str:
    """A printable table (layer, type, params, w_bits, a_bits, role) and the average-bits line."""
    rows = layer_table(model)
    width = max([len("layer")] + [len(r.name) for r in rows])

    def bits(b: int | None) -> str:
        return "fp32" if b is None else str(b)

    lines = [f"{'layer':<{width}}  {'type':<6}  {'params':>9}  {'w_bits':>6}  {'a_bits':>6}  role"]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.kind:<6}  {r.params:>9}  "
            f"{bits(r.w_bits):>6}  {bits(r.a_bits):>6}  {r.role}"
        )
    lines.append(average_bits(model).describe())
    return "\n".join(lines)
