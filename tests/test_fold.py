"""fold: codes, codebooks, input quantizers, conv attributes, batch-norm absorption, metadata."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from export_helpers import (
    CASES,
    TEST_MODEL_BN_FOLDED,
    TEST_MODEL_NOT_FOLDED,
    case_input,
    checkpoint_path,
    loaded,
    make_test_model,
    meta,
    one_thread,
    placeholders,
    quant_layers,
    run_skeleton,
    tmp_dir,
    torch_logits,
    trained_like,
)
from torch import nn

from adq_deploy import models
from adq_deploy.checkpoint import load_checkpoint, save_checkpoint
from adq_deploy.models.registry import unregister
from adq_deploy.quant import LSQ, N2UQ, InputQuant, QuantConfig, QuantConv2d, quantize_model
from adq_deploy.quant.apply import average_bits
from exporters.fold import fold, fold_input
from exporters.graph import consumers

ALL = tuple(CASES)


@pytest.mark.parametrize("name", ALL)
def test_codes_and_codebook_give_the_quantized_weight(name):
    ck, folded = loaded(name)
    layers = quant_layers(ck.model)
    assert set(folded.layers) == set(layers)
    for lname, layer in layers.items():
        f = folded.layers[lname]
        assert f.bits == layer.w_bits and f.role == layer.role
        assert f.codes.dtype == np.int64 and f.codes.shape == tuple(layer.weight.shape)
        assert f.codebook.dtype == np.float32
        assert f.codebook.shape == tuple(layer.weight_quant.codebook.shape)
        assert 0 <= f.codes.min() and f.codes.max() < f.codebook.size <= 2**f.bits
        with torch.no_grad():
            np.testing.assert_array_equal(f.weight, layer.quantized_weight().numpy())
        assert f.kind == ("conv" if isinstance(layer, QuantConv2d) else "gemm")


def test_conv_attributes_of_the_test_model():
    _, folded = loaded("test_model")
    conv = {n: lay.conv for n, lay in folded.layers.items()}
    assert conv["dw"] == {
        "kernel_shape": [3, 3],
        "strides": [1, 1],
        "pads": [1, 1, 1, 1],
        "dilations": [1, 1],
        "group": 8,
    }
    assert conv["grouped"]["group"] == 4 and conv["grouped"]["strides"] == [2, 2]
    assert conv["dilated"]["dilations"] == [2, 2] and conv["dilated"]["pads"] == [2, 2, 2, 2]
    assert conv["plain"]["kernel_shape"] == [3, 1]
    assert conv["plain"]["strides"] == [2, 1] and conv["plain"]["pads"] == [1, 0, 1, 0]
    assert folded.layers["hidden"].kind == "gemm" and conv["hidden"] == {}
    assert "float_conv" not in folded.layers and "stem" not in folded.layers


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "small_cnn"])
def test_input_quantizer_levels(name):
    """q = #{i : scale * x >= T_i} is the quantizer's level, and step * (q - zero_point) its
    output (the zero point is 0 but for a quantized network input)."""
    ck, folded = loaded(name)
    x = torch.randn(4000, generator=torch.Generator().manual_seed(3)) * 2
    checked = 0
    for lname, layer in quant_layers(ck.model).items():
        act = folded.layers[lname].act
        if layer.act_quant is None:
            assert act is None
            continue
        kinds = {N2UQ: "n2uq", LSQ: "lsq", InputQuant: "input"}
        assert act.kind == kinds[type(layer.act_quant)]
        assert act.zero_point == (int(layer.act_quant.zero_point) if act.kind == "input" else 0)
        assert act.bits == layer.a_bits
        assert act.thresholds.shape == (2**act.bits - 1,)
        assert (np.diff(act.thresholds) >= 0).all()
        v = (np.float32(act.scale) * x.numpy())[:, None]
        q = (v >= act.thresholds[None, :]).sum(1)
        with torch.no_grad():
            np.testing.assert_array_equal(q, layer.act_quant.levels_of(x).numpy())
            ref = layer.act_quant(x).numpy()
        np.testing.assert_allclose(act.step * (q - act.zero_point), ref, rtol=1e-6, atol=1e-7)
        assert 0 < q.mean() < 2**act.bits - 1  # trained-like: the levels do not collapse
        checked += 1
    assert checked


def test_bn_is_folded_after_the_layers_it_follows():
    ck, folded = loaded("test_model")
    flags = {n: lay.bn_folded for n, lay in folded.layers.items()}
    assert flags == {
        **dict.fromkeys(TEST_MODEL_BN_FOLDED, True),
        **dict.fromkeys(TEST_MODEL_NOT_FOLDED, False),
    }
    graph = folded.skeleton.graph
    nodes = placeholders(folded.skeleton)
    for name in TEST_MODEL_BN_FOLDED:
        users = consumers(graph, nodes[name].output[0])
        assert users and all(u.op_type != "BatchNormalization" for u in users)
    # `shared` feeds a BatchNormalization and the Add: the one BN left in the graph.
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 1
    shared_users = consumers(graph, nodes["shared"].output[0])
    assert sorted(u.op_type for u in shared_users) == ["Add", "BatchNormalization"]
    assert bns[0] in shared_users
    # the folded affine is not the identity: the BN statistics moved in training
    for name in TEST_MODEL_BN_FOLDED:
        f = folded.layers[name]
        assert not np.allclose(f.out_scale, 1) and not np.allclose(f.out_bias, 0)
    # `plain` (bias, no BN) and `shared` keep scale 1 and the layer bias
    np.testing.assert_array_equal(folded.layers["shared"].out_scale, 1)
    np.testing.assert_array_equal(folded.layers["shared"].out_bias, 0)
    plain = quant_layers(ck.model)["plain"]
    np.testing.assert_array_equal(folded.layers["plain"].out_scale, 1)
    np.testing.assert_array_equal(folded.layers["plain"].out_bias, plain.bias.detach().numpy())


def test_resnet20_every_body_conv_absorbs_its_bn():
    _, folded = loaded("resnet20")
    assert all(lay.bn_folded for lay in folded.layers.values())
    assert not [n for n in folded.skeleton.graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize("name", ["test_model", "resnet20", "small_cnn"])
def test_folded_skeleton_is_the_model(name):
    """Placeholders as out_scale * (layer(x) - bias) + out_bias: the absorbed BN is exact."""
    ck, folded = loaded(name)
    x = case_input(name, batch=4, seed=11)
    ref = torch_logits(ck.model, x)
    out = run_skeleton(folded.skeleton, ck.model, x, folded)
    assert np.abs(out - ref).mean() <= 1e-5 * np.abs(ref).mean()
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name", ALL)
def test_metadata(name):
    ck, folded = loaded(name)
    m = folded.metadata
    expected = meta(CASES[name])
    assert m["input_shape"] == expected["input_shape"]
    assert m["mean"] == pytest.approx(expected["mean"])
    assert m["std"] == pytest.approx(expected["std"])
    assert m["class_names"] == expected["class_names"]
    digest = hashlib.sha256(checkpoint_path(name).read_bytes()).hexdigest()
    assert m["checkpoint_sha256"] == digest
    assert m["avg_bits_param_weighted"] == pytest.approx(average_bits(ck.model).param_weighted)
    assert m["layer_bits"] == {
        n: {"w_bits": e["w_bits"], "a_bits": e["a_bits"]}
        for n, e in ck.layers.items()
        if e["w_bits"] is not None
    }


def test_resnet20_average_bits_is_mixed():
    _, folded = loaded("resnet20")
    assert folded.metadata["avg_bits_param_weighted"] == pytest.approx(2.845, abs=0.01)
    assert {lay.bits for lay in folded.layers.values()} == {2, 3, 4}


# ------------------------------------------------------------------------------------------
# What fold refuses.


class _Tiny(nn.Module):
    def __init__(self, padding="same", shared: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=padding, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.shared = shared

    def forward(self, x):
        x = torch.relu(self.bn1(self.body(torch.relu(self.stem(x)))))
        if self.shared:  # the same ADQ layer a second time, with its own BN
            x = torch.relu(self.bn2(self.body(x)))
        return self.fc(x.mean((2, 3)))


def tiny_checkpoint(path, quantize: bool = True, **kwargs):
    """A small checkpoint of _Tiny (registered while it is built and loaded back)."""
    models.register("adq_fold_tiny", _Tiny)
    try:
        torch.manual_seed(0)
        model = models.get("adq_fold_tiny", **kwargs)
        if quantize:
            quantize_model(model, QuantConfig())
        with one_thread():
            trained_like(model, (1, 8, 8), steps=2)
        save_checkpoint(model, path, input_shape=[1, 8, 8])
        return load_checkpoint(path)
    finally:
        unregister("adq_fold_tiny")


def test_string_padding_is_refused():
    ck = tiny_checkpoint(tmp_dir() / "fold_same.pt", padding="same")
    assert isinstance(quant_layers(ck.model)["body"], QuantConv2d)
    with pytest.raises(ValueError, match="string padding 'same'"):
        fold(ck)


def test_a_layer_called_twice_is_refused():
    """One set of tensors for two call sites: folding both BNs into it would be wrong."""
    ck = tiny_checkpoint(tmp_dir() / "fold_shared.pt", padding=1, shared=True)
    with pytest.raises(ValueError, match="body runs 2 times"):
        fold(ck)


def test_a_float_model_is_refused():
    ck = tiny_checkpoint(tmp_dir() / "fold_float.pt", quantize=False, padding=1)
    with pytest.raises(ValueError, match="no ADQ layers"):
        fold(ck)


def test_an_uncalibrated_input_quantizer_is_refused():
    """input_bits without a training step: step 1 and zero point 0 would clip the normalized
    input to the integers 0..255, so folding refuses (a calibrated one folds)."""
    model = quantize_model(
        make_test_model(), QuantConfig(w_bits=3, a_bits=3, edge_bits=8, input_bits=8)
    )
    quant = quant_layers(model)["stem"].act_quant
    assert isinstance(quant, InputQuant) and not bool(quant.initialized)
    with pytest.raises(ValueError, match="never calibrated"):
        fold_input(quant)
    quant.train()(torch.randn(64) * 2)
    folded = fold_input(quant)
    assert folded.kind == "input" and folded.zero_point == int(quant.zero_point) > 0
