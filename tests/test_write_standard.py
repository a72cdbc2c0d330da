"""The standard format: stock ONNX only, low-bit code tensors, run through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_helpers import (
    MODEL_CASES,
    assert_logits_match,
    case_input,
    initializers,
    loaded,
    one_thread,
    onnx_model,
    run_onnx,
    safe_input,
    tmp_dir,
    torch_logits,
    trained_like,
)
from onnx import TensorProto
from torch import nn

from adq_deploy import models
from adq_deploy.checkpoint import load_checkpoint, save_checkpoint
from adq_deploy.models.registry import unregister
from adq_deploy.quant import QuantConfig, quantize_model
from exporters.export import simplify
from exporters.fold import FoldedInput, FoldedLayer, fold
from exporters.write_standard import code_type, uniform_count_nodes, write_standard

EXPECTED_CODE_TYPE = {  # opset -> bits -> code tensor type
    25: {2: TensorProto.UINT2, 3: TensorProto.UINT4, 4: TensorProto.UINT4},
    21: {2: TensorProto.UINT4, 3: TensorProto.UINT4, 4: TensorProto.UINT4},
    17: {2: TensorProto.UINT8, 3: TensorProto.UINT8, 4: TensorProto.UINT8},
}


@pytest.mark.parametrize("name", MODEL_CASES)
def test_matches_the_pytorch_model(name):
    """Mean |logit error| <= 1e-4 mean |logit| and the same top-1, through onnxruntime."""
    ck, _ = loaded(name)
    x = case_input(name, batch=5, seed=1)
    out = run_onnx(onnx_model(name, "standard"), x)
    ratio = assert_logits_match(out, torch_logits(ck.model, x))
    print(f"{name}: mean abs error / mean |logit| = {ratio:.2e}")


@pytest.mark.parametrize("name", MODEL_CASES)
def test_valid_and_default_domain_only(name):
    model = onnx_model(name, "standard")
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 25)]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert not model.graph.value_info or all(v.name for v in model.graph.value_info)


@pytest.mark.parametrize("opset", sorted(EXPECTED_CODE_TYPE, reverse=True))
@pytest.mark.parametrize("name", ["resnet20", "test_model"])
def test_code_types_and_onnxruntime_at_each_opset(name, opset):
    """UINT2 for 2-bit and UINT4 for 3/4-bit codes at opset 25, UINT4 at 21, UINT8 at 17;
    the model is valid and runs in onnxruntime at each."""
    ck, folded = loaded(name)
    model = onnx_model(name, "standard", opset)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    inits = initializers(model)
    for lname, layer in folded.layers.items():
        t = inits[f"{lname}.codes"]
        assert t.data_type == EXPECTED_CODE_TYPE[opset][layer.bits], (lname, layer.bits)
        assert t.data_type == code_type(layer.bits, opset)
        assert list(t.dims) == list(layer.codes.shape)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), layer.codes)
        if t.data_type != TensorProto.UINT8:  # sub-byte: packed two (four) per byte
            per_byte = 8 // (2 if t.data_type == TensorProto.UINT2 else 4)
            assert len(t.raw_data) == -(-layer.codes.size // per_byte)
    x = case_input(name, batch=3, seed=opset)
    assert_logits_match(run_onnx(model, x), torch_logits(ck.model, x))


def test_every_bit_width_is_exercised():
    _, folded = loaded("resnet20")
    assert {lay.bits for lay in folded.layers.values()} == {2, 3, 4}


@pytest.mark.parametrize("name", ["test_model", "resnet20"])
def test_dynamic_batch(name):
    ck, _ = loaded(name)
    model = onnx_model(name, "standard")
    x = case_input(name, batch=5, seed=2)
    out5 = run_onnx(model, x)
    out1 = run_onnx(model, x[:1])
    assert out5.shape[0] == 5 and out1.shape == (1, out5.shape[1])
    np.testing.assert_allclose(out1[0], out5[0], rtol=1e-5, atol=1e-6)
    assert_logits_match(out1, torch_logits(ck.model, x[:1]))


def test_eight_bit_layers_use_uint8_codes():
    """small_cnn's W8 edge layers cannot use a sub-byte type at any opset."""
    _, folded = loaded("small_cnn")
    inits = initializers(onnx_model("small_cnn", "standard"))
    for lname, layer in folded.layers.items():
        expected = TensorProto.UINT8 if layer.bits == 8 else TensorProto.UINT2
        assert inits[f"{lname}.codes"].data_type == expected


def test_opset_too_old_is_refused():
    _, folded = loaded("test_model")
    with pytest.raises(ValueError, match="too old"):
        write_standard(folded, 12)


class _OldOpsetNet(nn.Module):
    """Skeleton ops whose form changed after opset 13: an unfolded BatchNormalization
    (training_mode, 14), Reshape (allowzero, 14) and ReduceMean (axes as an input, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        t = self.body(x)
        x = torch.relu(self.bn(t) + t)  # two consumers: the BN stays a node
        x = x.mean(2).reshape(x.shape[0], -1)  # [N, 8, 4] -> [N, 32]
        return self.fc(x[:, :32])


@pytest.fixture(scope="module")
def old_opset_net():
    models.register("adq_old_opset_net", _OldOpsetNet)
    try:
        with one_thread():
            torch.manual_seed(0)
            model = quantize_model(models.get("adq_old_opset_net"), QuantConfig(w_bits=3))
            trained_like(model, (1, 6, 4), steps=2)
            path = save_checkpoint(model, tmp_dir() / "old_opset.pt", input_shape=[1, 6, 4])
            ck = load_checkpoint(path)
            yield ck, fold(ck)
    finally:
        unregister("adq_old_opset_net")


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("simplified", [False, True])
def test_old_opsets_rewrite_the_skeleton_nodes(old_opset_net, opset, simplified):
    ck, folded = old_opset_net
    assert not folded.layers["body"].bn_folded
    model = write_standard(folded, opset)
    if simplified:
        model = simplify(model)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type: n for n in model.graph.node}
    if not simplified:
        assert {"BatchNormalization", "ReduceMean", "Reshape"} <= set(ops)
        mean_axes = [a for a in ops["ReduceMean"].attribute if a.name == "axes"]
        assert (len(ops["ReduceMean"].input), len(mean_axes)) == ((1, 1) if opset < 18 else (2, 0))
    x = safe_input(ck.model, folded, (1, 6, 4), batch=3)
    assert_logits_match(run_onnx(model, x), torch_logits(ck.model, x))


@pytest.mark.parametrize("zp", [0, 128, 255])
def test_uniform_count_nodes_are_the_exact_threshold_count(zp):
    """The standard-op count of a quantized network input (floor, clip, two corrections; no
    [..., 255] comparison tensor) equals the brute-force count in onnxruntime, on and next to
    every threshold, far outside the range and for inf / NaN: what ThresholdQuant gives."""
    t = (np.arange(1, 256) - zp - 0.5).astype(np.float32)
    act = FoldedInput("input", 8, np.float32(1 / 0.02), t, np.float32(0.02), zp)
    layer = FoldedLayer(
        "stem", "conv", "first", 8, np.zeros((1, 1), np.int64), np.zeros(1, np.float32), act,
        np.ones(1, np.float32), np.zeros(1, np.float32),
    )  # fmt: skip
    graph = onnx.helper.make_graph([], "count", [], [])
    nodes, levels = uniform_count_nodes(graph, layer, "x")
    graph.node.extend(nodes)
    graph.input.append(onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]))
    graph.output.append(onnx.helper.make_tensor_value_info(levels, TensorProto.FLOAT, [None]))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    edges = np.concatenate([t, [0, 1e9, -1e9, 3e38, -3e38, 2.0**22]]).astype(np.float32)
    near = [np.nextafter(edges, np.float32(d)) for d in (np.inf, -np.inf)]
    rng = np.random.default_rng(zp)
    xs = np.concatenate([edges, *near, rng.normal(0, 200, 5000).astype(np.float32)])
    xs = np.concatenate([xs, [np.inf, -np.inf, np.nan]]).astype(np.float32) * np.float32(0.02)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": xs})
    scaled = (np.float32(act.scale) * xs).astype(np.float32)
    expected = (scaled[:, None] >= t[None, :]).sum(1)
    np.testing.assert_array_equal(got, expected)
    assert not [n for n in nodes if n.op_type in ("Unsqueeze", "ReduceSum")]
