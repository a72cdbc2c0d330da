"""quantize_model, the ADQ layers, the summary / average-bits report and QuantConfig."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adq_deploy.quant import (
    LSQ,
    N2UQ,
    InputQuant,
    QuantConfig,
    QuantConv2d,
    QuantLayerMixin,
    QuantLinear,
    average_bits,
    layer_table,
    plan_layers,
    quantize_model,
    summary,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.grouped(F.relu(self.dw(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.strided = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.pw = nn.Conv2d(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = self.block(x)
        x = F.relu(self.strided(x))
        x = F.relu(x + self.pw(F.relu(self.dilated(x))))  # residual add
        x = self.gap(self.pool(x)).flatten(1)
        return self.head(F.relu(self.fc(x)))


# weight counts by hand: out * in / groups * kh * kw
PARAMS = {
    "stem": 8 * 3 * 9,  # 216
    "block.dw": 8 * 1 * 9,  # 72
    "block.grouped": 16 * 4 * 9,  # 576
    "strided": 16 * 16 * 9,  # 2304
    "dilated": 16 * 16 * 9,  # 2304
    "pw": 16 * 16,  # 256
    "fc": 16 * 32,  # 512
    "head": 32 * 10,  # 320
}
BODY = ["block.dw", "block.grouped", "strided", "dilated", "pw", "fc"]
CONVS = ["stem", "block.dw", "block.grouped", "strided", "dilated", "pw"]


def make_net(seed: int = 0) -> Net:
    """He-initialized, so activations keep their scale and every 2-bit N2UQ input level is used."""
    torch.manual_seed(seed)
    net = Net()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
    return net


def make_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscription stalls on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mods(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def brute_quant_weight(w: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    idx = (w.detach().reshape(-1, 1) - cb.reshape(1, -1)).abs().argmin(dim=1)
    return cb[idx].reshape(w.shape)


# ----------------------------------------------------------------------------- the main scenario


def test_quantize_model_replaces_body_layers():
    model = make_net()
    ref = copy.deepcopy(model)
    weights_before = {n: m.weight for n, m in mods(model).items() if n in PARAMS}
    cfg = QuantConfig(w_bits=3, a_bits=2, layer_bits={"dilated": 2})
    assert quantize_model(model, cfg) is model
    mm = mods(model)
    assert type(mm["stem"]) is nn.Conv2d and type(mm["head"]) is nn.Linear
    for name in BODY:
        m = mm[name]
        assert isinstance(m, QuantLayerMixin), name
        assert type(m) is (QuantLinear if name == "fc" else QuantConv2d)
        assert m.weight is weights_before[name], "the quantized layer shares the float parameter"
        assert m.w_bits == (2 if name == "dilated" else 3)
        assert m.weight_quant.codebook.numel() == 2**m.w_bits
        assert isinstance(m.act_quant, N2UQ) and m.act_quant.bits == 2 and m.a_bits == 2
        assert m.role == "body"
    for name in BODY[:-1]:
        r, m = mods(ref)[name], mm[name]
        assert (m.stride, m.padding, m.dilation, m.groups) == (
            r.stride,
            r.padding,
            r.dilation,
            r.groups,
        )
        assert (m.in_channels, m.out_channels, m.kernel_size) == (
            r.in_channels,
            r.out_channels,
            r.kernel_size,
        )
        assert (m.bias is None) == (r.bias is None)
    assert mm["block.dw"].groups == 8 and mm["block.grouped"].groups == 2
    assert mm["strided"].stride == (2, 2) and mm["dilated"].dilation == (2, 2)
    assert model.adq_config is cfg
    assert model.adq_roles == {
        "stem": "first",
        "head": "last",
        **{n: "body" for n in BODY},
    }

    model.train()
    y = model(make_input())
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.square().mean().backward()
    for name in BODY + ["stem", "head"]:
        grad = mm[name].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for name in BODY:
        aq = mm[name].act_quant
        for pname in ("start", "widths", "alpha1", "alpha2"):
            grad = getattr(aq, pname).grad
            assert grad is not None and torch.isfinite(grad).all(), (name, pname)
        assert aq.alpha2.grad.abs().item() > 0, name
    assert sum(mm[n].act_quant.widths.grad.abs().sum().item() for n in BODY) > 0


def test_summary_and_average_bits():
    model = quantize_model(make_net(), QuantConfig(w_bits=3, a_bits=2, layer_bits={"dilated": 2}))
    rows = {r.name: r for r in layer_table(model)}
    assert list(rows) == list(PARAMS)
    for name, n in PARAMS.items():
        assert rows[name].params == n
    assert rows["stem"].w_bits is None and rows["stem"].role == "first"
    assert rows["head"].w_bits is None and rows["head"].role == "last"
    assert rows["dilated"].w_bits == 2 and rows["fc"].kind == "Linear"

    text = summary(model).splitlines()
    table = {line.split()[0]: line.split() for line in text[1:-1]}
    assert set(table) == set(PARAMS)
    expected_kind = {n: ("Linear" if n in ("fc", "head") else "Conv2d") for n in PARAMS}
    for name, n in PARAMS.items():
        _, kind, params, wb, ab, role = table[name]
        assert (kind, int(params)) == (expected_kind[name], n)
        if name in ("stem", "head"):
            assert (wb, ab, role) == ("fp32", "fp32", "first" if name == "stem" else "last")
        else:
            assert (wb, ab, role) == ("2" if name == "dilated" else "3", "2", "body")

    avg = average_bits(model)
    # body weights: 72 + 576 + 2304 + 2304 + 256 + 512 = 6024; bits: 2 for `dilated`, 3 elsewhere
    assert avg.params == 6024 and avg.layers == 6
    assert avg.param_weighted == pytest.approx((3720 * 3 + 2304 * 2) / 6024)  # 15768 / 6024
    assert avg.layer_mean == pytest.approx(17 / 6)
    assert set(avg.excluded) == {"stem", "head"}
    assert "float" in avg.excluded["stem"] and "first" in avg.excluded["stem"]
    assert "float" in avg.excluded["head"] and "last" in avg.excluded["head"]
    line = text[-1]
    assert "2.618 parameter-weighted" in line and "2.833 per-layer mean" in line
    assert "stem" in line and "head" in line


@pytest.mark.parametrize("train", [False, True])
def test_quantized_forward_equals_manual(train):
    model = make_net()
    ref = copy.deepcopy(model)
    quantize_model(model, QuantConfig(w_bits=3, a_bits=2))
    model.train(train)
    mm = mods(model)
    inputs, outputs, codebooks = {}, {}, {}

    def hook(name):
        def fn(module, args, out):
            inputs[name] = args[0].detach().clone()
            outputs[name] = out.detach().clone()

        return fn

    for name in BODY:
        codebooks[name] = mm[name].weight_quant.codebook.clone()  # before EMA moves it
        mm[name].register_forward_hook(hook(name))
    model(make_input())
    rm = mods(ref)
    for name in BODY:
        m, r = mm[name], rm[name]
        wq = brute_quant_weight(m.weight, codebooks[name])
        with torch.no_grad():
            xq = m.act_quant(inputs[name])
            if name == "fc":
                manual = F.linear(xq, wq, r.bias)
            else:
                manual = F.conv2d(xq, wq, r.bias, r.stride, r.padding, r.dilation, r.groups)
        torch.testing.assert_close(outputs[name], manual, rtol=1e-5, atol=1e-6)
        # activations reach the layer as alpha2 * 2 / (L - 1) * q with integer q in 0..L-1
        q = xq / m.act_quant.step()
        assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 3
    if train:  # the training forward was also one EMA step
        assert any(not torch.equal(codebooks[n], mm[n].weight_quant.codebook) for n in BODY)
    else:
        assert all(torch.equal(codebooks[n], mm[n].weight_quant.codebook) for n in BODY)


# ----------------------------------------------------------------------------- config variants


def test_default_config_end_to_end():
    model = quantize_model(make_net())
    mm = mods(model)
    for name in BODY:
        assert mm[name].w_bits == 4 and mm[name].a_bits == 4
        assert mm[name].weight_quant.codebook.numel() == 16
        assert isinstance(mm[name].act_quant, N2UQ)
    assert type(mm["stem"]) is nn.Conv2d and type(mm["head"]) is nn.Linear
    y = model(make_input())
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(mm[n].weight.grad is not None for n in BODY)
    assert average_bits(model).param_weighted == pytest.approx(4.0)


def test_edge_bits_8():
    model = quantize_model(make_net(), QuantConfig(w_bits=3, a_bits=3, edge_bits=8))
    mm = mods(model)
    stem, head = mm["stem"], mm["head"]
    assert isinstance(stem, QuantConv2d) and isinstance(head, QuantLinear)
    assert (stem.role, head.role) == ("first", "last")
    assert stem.w_bits == 8 and stem.weight_quant.codebook.numel() == 256
    assert stem.act_quant is None and stem.a_bits is None, "the image input stays float"
    assert head.w_bits == 8 and isinstance(head.act_quant, N2UQ) and head.a_bits == 8
    assert torch.isfinite(model(make_input())).all()
    avg = average_bits(model)
    assert avg.layers == 6 and avg.param_weighted == pytest.approx(3.0)
    assert set(avg.excluded) == {"stem", "head"}
    assert "W8" in avg.excluded["stem"] and "W8" in avg.excluded["head"]
    # the first layer's forward has no input quantizer: exact float input, codebook weights
    x = make_input()
    with torch.no_grad():
        manual = F.conv2d(
            x, brute_quant_weight(stem.weight, stem.weight_quant.codebook), stem.bias, 1, 1
        )
        torch.testing.assert_close(stem.eval()(x), manual, rtol=1e-5, atol=1e-6)


def test_input_bits_quantize_the_first_layer_input():
    """input_bits=8: the first layer reads its input through InputQuant, (q - z) * s with
    zero padding at level z, and otherwise computes what test_edge_bits_8 checks."""
    model = quantize_model(make_net(), QuantConfig(w_bits=3, a_bits=3, edge_bits=8, input_bits=8))
    stem, head = mods(model)["stem"], mods(model)["head"]
    assert isinstance(stem.act_quant, InputQuant) and stem.a_bits == 8
    assert isinstance(head.act_quant, N2UQ) and head.a_bits == 8
    plans = {p.name: p for p in plan_layers(make_net(), model.adq_config)}
    assert (plans["stem"].w_bits, plans["stem"].a_bits) == (8, 8)
    x = make_input()
    model.train()(x)  # the first batch sets step and zero point
    aq = stem.act_quant
    assert bool(aq.initialized) and 0 < int(aq.zero_point) < 255
    with torch.no_grad():
        v = (aq.levels_of(x).long() - aq.zero_point).float() * aq.step()
        manual = F.conv2d(
            v, brute_quant_weight(stem.weight, stem.weight_quant.codebook), stem.bias, 1, 1
        )
        torch.testing.assert_close(stem.eval()(x), manual, rtol=1e-5, atol=1e-6)
        assert (v - x).abs().max() <= aq.step() / 2 + 1e-6  # the range holds the batch


def test_skip_patterns_keep_layers_float():
    model = quantize_model(make_net(), QuantConfig(w_bits=3, a_bits=3, skip=("block.*", "pw")))
    mm = mods(model)
    for name in ("block.dw", "block.grouped", "pw"):
        assert type(mm[name]) is nn.Conv2d, name
    for name in ("strided", "dilated", "fc"):
        assert isinstance(mm[name], QuantLayerMixin), name
    rows = {r.name: r for r in layer_table(model)}
    assert rows["pw"].role == "skip" and rows["pw"].w_bits is None
    avg = average_bits(model)
    assert avg.params == 2304 + 2304 + 512 and avg.layers == 3
    assert set(avg.excluded) == {"stem", "head", "block.dw", "block.grouped", "pw"}
    assert torch.isfinite(model(make_input())).all()


def test_act_none_and_lsq():
    model = quantize_model(make_net(), QuantConfig(w_bits=3, act="none"))
    for name in BODY:
        assert mods(model)[name].act_quant is None and mods(model)[name].a_bits is None
    assert torch.isfinite(model(make_input())).all()

    model = quantize_model(make_net(), QuantConfig(w_bits=3, a_bits=3, act="lsq"))
    for name in BODY:
        aq = mods(model)[name].act_quant
        assert isinstance(aq, LSQ) and aq.bits == 3
    y = model.train()(make_input())
    assert torch.isfinite(y).all()
    assert all(bool(mods(model)[n].act_quant.initialized) for n in BODY)

    model = quantize_model(make_net(), QuantConfig(w_bits=3, act="none", edge_bits=8))
    assert mods(model)["head"].act_quant is None


def test_per_layer_activation_bits():
    cfg = QuantConfig(w_bits=3, a_bits=2, layer_a_bits={"pw": 4})
    model = quantize_model(make_net(), cfg)
    assert mods(model)["pw"].a_bits == 4 and mods(model)["strided"].a_bits == 2


def test_errors_missing_layer_and_double_quantization():
    with pytest.raises(ValueError, match="nope"):
        quantize_model(make_net(), QuantConfig(layer_bits={"nope": 2}))
    with pytest.raises(ValueError):
        quantize_model(make_net(), QuantConfig(layer_a_bits={"block.nope": 2}))
    model = quantize_model(make_net(), QuantConfig())
    with pytest.raises(ValueError):
        quantize_model(model, QuantConfig())


def test_symmetric_form_and_inits_through_config():
    for init in ("quantile", "uniform", "kmeans"):
        cfg = QuantConfig(w_bits=3, w_form="symmetric", w_init=init)
        model = quantize_model(make_net(), cfg)
        for name in BODY:
            wq = mods(model)[name].weight_quant
            assert wq.codebook.numel() == 7 and wq.init == init and wq.form == "symmetric"
        assert torch.isfinite(model(make_input())).all()


# ----------------------------------------------------------------------------- QuantConfig


def test_config_round_trip():
    cfg = QuantConfig(
        w_bits=3,
        a_bits=2,
        w_form="symmetric",
        w_init="kmeans",
        ema=False,
        ema_beta=0.9,
        clip_grad=True,
        act="lsq",
        edge_bits=8,
        input_bits=8,
        skip=("block.*",),
        layer_bits={"pw": 2},
        layer_a_bits={"fc": 4},
    )
    d = cfg.to_dict()
    assert d["skip"] == ["block.*"] and d["layer_bits"] == {"pw": 2}
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()
    assert cfg.replace(w_bits=4).w_bits == 4 and cfg.w_bits == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w_bits": 1},
        {"w_bits": 9},
        {"a_bits": 0},
        {"a_bits": 9},
        {"layer_bits": {"pw": 1}},
        {"layer_a_bits": {"pw": 12}},
        {"w_form": "half"},
        {"w_init": "random"},
        {"act": "pact"},
        {"ema_beta": 1.0},
        {"edge_bits": 4},
        {"input_bits": 8},  # needs edge_bits 8
        {"input_bits": 4, "edge_bits": 8},
        {"input_bits": 8, "edge_bits": 8, "skip_first": False},
        {"version": 2},
    ],
)
def test_config_validation_errors(kwargs):
    with pytest.raises(ValueError):
        QuantConfig(**kwargs)
    d = QuantConfig().to_dict()
    d.update(kwargs)
    with pytest.raises(ValueError):
        QuantConfig.from_dict(d)


def test_config_unknown_key():
    d = QuantConfig().to_dict()
    d["w_bitz"] = 3
    with pytest.raises(ValueError, match="w_bitz"):
        QuantConfig.from_dict(d)
    with pytest.raises(ValueError):
        QuantConfig().replace(w_bits=0)


def test_config_does_not_share_state():
    a, b = QuantConfig(), QuantConfig()
    a.layer_bits["x"] = 2
    assert b.layer_bits == {}
    assert np.isclose(QuantConfig().ema_beta, 0.99)
