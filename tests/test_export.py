"""export() and adq-export end to end: written files, metadata, sizes, simplification, the CLI
(summary, atomic writes, one-line errors), and a full-size ResNet-18."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from export_helpers import (
    CASES,
    ROOT,
    assert_logits_match,
    case_input,
    checkpoint_path,
    initializers,
    loaded,
    make_test_model,
    meta,
    one_thread,
    registered,
    run_onnx,
    safe_input,
    snapped_model,
    tmp_dir,
    torch_logits,
    trained_like,
)
from onnx import TensorProto
from torch import nn

from adq_deploy import __version__, models
from adq_deploy.checkpoint import load_checkpoint, save_checkpoint
from adq_deploy.cli import export_main
from adq_deploy.models.registry import unregister
from adq_deploy.quant import QuantConfig, quantize_model
from exporters import export as export_module
from exporters.export import export
from exporters.fold import fold

FORMATS = ("adq", "standard", "int8")
LOW_BIT_TYPES = {TensorProto.UINT2, TensorProto.UINT4, TensorProto.UINT8, TensorProto.INT8}


@pytest.fixture(scope="module")
def exported():
    """resnet20 (mixed 2/3/4-bit weights, 2.85 average) exported in each format, simplified."""
    ck_path = checkpoint_path("resnet20")
    out = tmp_dir() / "exported"
    results = {}
    with one_thread():
        for fmt in FORMATS:
            results[fmt] = export(ck_path, out / f"resnet20.{fmt}.onnx", fmt=fmt)
    return results


def unquantized_bytes(name: str) -> int:
    """fp32 bytes the low-bit scheme leaves alone: the float layers' weights and biases, and
    each ADQ layer's per-channel scale and bias (4 bytes a value)."""
    ck, folded = loaded(name)
    state = ck.model.state_dict()
    float_layers = [n for n, e in ck.layers.items() if e["w_bits"] is None]
    size = sum(
        state[f"{n}.{p}"].numel() * 4
        for n in float_layers
        for p in ("weight", "bias")
        if f"{n}.{p}" in state
    )
    return size + sum(2 * 4 * lay.out_channels for lay in folded.layers.values())


def size_bound(avg_bits: float, fp32_size: int, unquantized: int) -> float:
    return 1.15 * (avg_bits / 32) * fp32_size + unquantized


# ------------------------------------------------------------------------------------------
# The written files.


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata(exported, fmt):
    result = exported[fmt]
    model = onnx.load(str(result.path))
    props = {p.key: p.value for p in model.metadata_props}
    ck, _ = loaded("resnet20")
    expected = meta(CASES["resnet20"])
    assert props["adq.format"] == fmt
    assert props["adq.opset"] == {"adq": "ai.adq:1", "standard": "25", "int8": "none"}[fmt]
    assert props["adq.package_version"] == __version__
    assert json.loads(props["adq.input_shape"]) == expected["input_shape"]
    assert json.loads(props["adq.mean"]) == pytest.approx(expected["mean"])
    assert json.loads(props["adq.std"]) == pytest.approx(expected["std"])
    assert json.loads(props["adq.class_names"]) == expected["class_names"]
    digest = hashlib.sha256(checkpoint_path("resnet20").read_bytes()).hexdigest()
    assert props["adq.checkpoint_sha256"] == digest
    avg = json.loads(props["adq.avg_bits_param_weighted"])
    assert avg == pytest.approx(ck.metrics["avg_bits_param_weighted"])
    assert avg == pytest.approx(2.845, abs=0.01)
    assert json.loads(props["adq.layer_bits"]) == {
        n: {"w_bits": e["w_bits"], "a_bits": e["a_bits"]}
        for n, e in ck.layers.items()
        if e["w_bits"] is not None
    }
    assert model.producer_name == "adq-deploy"


@pytest.mark.parametrize("fmt", FORMATS)
def test_written_file_matches_the_pytorch_model(exported, fmt):
    ck, folded = loaded("resnet20")
    reference = snapped_model(ck, folded) if fmt == "int8" else ck.model
    x = case_input("resnet20", batch=4, seed=7, model=reference)
    out = run_onnx(exported[fmt].path, x)
    ref = torch_logits(reference, x)
    assert_logits_match(out, ref, rel=1e-5 if fmt == "int8" else 1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_simplification_never_folds_codes_back(exported, fmt):
    """Every ADQ layer keeps its low-bit code initializer; no float tensor of a layer's full
    weight size exists."""
    _, folded = loaded("resnet20")
    model = onnx.load(str(exported[fmt].path))
    inits = initializers(model)
    float_sizes = {int(np.prod(i.dims)) for i in inits.values() if i.data_type == TensorProto.FLOAT}
    for name, layer in folded.layers.items():
        if fmt == "int8":
            t = inits.get(f"{name}.weight_int8", inits.get(f"{name}.weight_int8_t"))
            assert t is not None and t.data_type == TensorProto.INT8, name
        else:
            t = inits[f"{name}.codes"]
            expected = (
                TensorProto.UINT8
                if fmt == "adq"
                else (TensorProto.UINT2 if layer.bits == 2 else TensorProto.UINT4)
            )
            assert t.data_type == expected, name
        assert t.data_type in LOW_BIT_TYPES
        assert layer.codes.size not in float_sizes, name
    if fmt != "adq":  # onnxsim ran: the graph is still the low-bit one
        ops = {n.op_type for n in model.graph.node}
        assert ("Gather" in ops) if fmt == "standard" else ("ConvInteger" in ops)


def test_file_sizes(exported):
    """adq <= 1.15 x (avg_bits / 32) x fp32 + unquantized bytes; standard <= 1.5 x that."""
    ck, _ = loaded("resnet20")
    avg = ck.metrics["avg_bits_param_weighted"]
    fp32 = exported["adq"].fp32_size_bytes
    bound = size_bound(avg, fp32, unquantized_bytes("resnet20"))
    sizes = {fmt: r.size_bytes for fmt, r in exported.items()}
    for r in exported.values():
        assert r.size_bytes == r.path.stat().st_size
        assert r.fp32_size_bytes == fp32
    print(f"resnet20 fp32 {fp32:,} B, bound {bound:,.0f} B, sizes {sizes}")
    assert sizes["adq"] <= bound
    assert sizes["standard"] <= 1.5 * bound
    assert sizes["adq"] < sizes["standard"] < sizes["int8"] < fp32


def test_summary(exported):
    _, folded = loaded("resnet20")
    text = exported["standard"].summary()
    for name, layer in folded.layers.items():
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        assert f" {layer.bits} " in line and line.rstrip().endswith("yes")
    assert "average weight bits 2.845" in text
    assert "x the fp32 ONNX" in text


def test_write_is_atomic(tmp_path, monkeypatch):
    """A failure while saving leaves the old file and no temporary file behind."""
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(export_module.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        export_module.write(model, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    monkeypatch.undo()
    assert export_module.write(model, target) == target.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


# ------------------------------------------------------------------------------------------
# adq-export.


def invoke(args):
    with one_thread():
        return CliRunner().invoke(export_main, [str(a) for a in args])


def assert_one_error_line(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def factory_checkpoint():
    """The test model saved with a 'module:function' architecture (not in the registry)."""
    case = CASES["test_model"]
    folder = tmp_dir() / "factory"
    folder.mkdir(exist_ok=True)
    torch.manual_seed(3)
    model = make_test_model(**case.kwargs)
    quantize_model(model, case.config)
    with one_thread():
        trained_like(model, case.input_shape, steps=2)
    arch = {"factory": "tests.export_helpers:make_test_model", "kwargs": case.kwargs}
    return save_checkpoint(model, folder / "net.pt", architecture=arch, **meta(case))


def test_cli_needs_allow_import_for_a_factory(factory_checkpoint, tmp_path):
    result = invoke([factory_checkpoint, "-o", tmp_path / "x.onnx"])
    assert_one_error_line(result, "allow_import", "--allow-import")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_and_prints_a_summary(factory_checkpoint, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the factory 'tests.export_helpers' is importable
    result = invoke([factory_checkpoint, "--allow-import", "--format", "standard"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.stdout
    assert out.splitlines()[0].split() == ["layer", "kind", "w_bits", "a_bits", "bn", "folded"]
    for name, bits in CASES["test_model"].config.layer_bits.items():
        (line,) = [ln for ln in out.splitlines() if ln.startswith(name + " ")]
        assert line.split()[2] == str(bits)
    assert "average weight bits" in out and "excluded: stem, float_conv, head" in out
    assert re.search(r"bytes = 0\.\d{3} x the fp32 ONNX \([\d,]+ bytes\)", out), out
    # default output path beside the checkpoint; nothing else left there (no temp files)
    written = factory_checkpoint.with_suffix(".standard.onnx")
    assert f"wrote {written} (standard)" in out
    assert sorted(p.name for p in factory_checkpoint.parent.iterdir()) == [
        "net.pt",
        "net.standard.onnx",
    ]
    ck = load_checkpoint(factory_checkpoint, allow_import=True)
    with one_thread():
        x = safe_input(ck.model, fold(ck), CASES["test_model"].input_shape, batch=2)
    assert_logits_match(run_onnx(written, x), torch_logits(ck.model, x))


class _Odd(nn.Module):
    """A small network with a 'same'-padded conv, or a conv called twice (shared weights)."""

    def __init__(self, case: str = "same") -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding="same" if case == "same" else 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.case = case

    def forward(self, x):
        x = torch.relu(self.bn(self.body(torch.relu(self.stem(x)))))
        if self.case == "shared":
            x = torch.relu(self.body(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def bad_checkpoints():
    """Files adq-export must refuse, each with one error line."""
    folder = tmp_dir() / "bad"
    folder.mkdir(exist_ok=True)
    paths = {"random": folder / "random.pt", "missing": folder / "missing.pt"}
    paths["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    models.register("adq_export_odd", _Odd)
    try:
        with one_thread():
            for case in ("same", "shared"):
                torch.manual_seed(0)
                model = quantize_model(models.get("adq_export_odd", case=case), QuantConfig())
                trained_like(model, (1, 8, 8), steps=1)
                paths[case] = save_checkpoint(model, folder / f"{case}.pt", input_shape=[1, 8, 8])
        torch.manual_seed(0)
        float_model = models.get("small_cnn", width=4)
        paths["float"] = save_checkpoint(float_model, folder / "float.pt", input_shape=[1, 28, 28])
        yield paths
    finally:
        unregister("adq_export_odd")


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing", ["missing.pt", "no such file"]),
        # (the message, from adq_deploy.checkpoint, calls random bytes "possibly code")
        ("random", ["random.pt"]),
        ("float", ["no ADQ layers"]),
        ("same", ["layer body", "string padding 'same'"]),
        ("shared", ["layer body runs 2 times"]),
    ],
)
def test_cli_refuses_bad_checkpoints(bad_checkpoints, tmp_path, case, fragments):
    """One error line, exit 2; a pre-existing output file is left untouched."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    result = invoke([bad_checkpoints[case], "-o", out])
    assert_one_error_line(result, *fragments)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_cli_refuses_an_unwritable_output(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    result = invoke([checkpoint_path("test_model"), "-o", regular / "model.onnx"])
    assert_one_error_line(result, "cannot write", "a_file")
    result = invoke([checkpoint_path("test_model"), "-o", tmp_path])  # a folder
    assert_one_error_line(result, "cannot write")
    assert regular.read_text() == "x"


def test_a_failing_onnxsim_is_one_error_line_and_writes_nothing(
    factory_checkpoint, tmp_path, monkeypatch
):
    import onnxsim

    monkeypatch.syspath_prepend(str(ROOT))  # the factory 'tests.export_helpers' is importable

    def broken(model, *args, **kwargs):
        raise RuntimeError("Unrecognized attribute: x for operator Constant\n\n==> Context: ...")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    out = tmp_path / "m.onnx"
    args = [factory_checkpoint, "--allow-import", "--format", "standard", "-o", out]
    result = invoke(args)
    assert_one_error_line(result, "onnxsim", "Unrecognized attribute: x", "--no-simplify")
    assert "Context" not in result.output and list(tmp_path.iterdir()) == []
    assert invoke([*args, "--no-simplify"]).exit_code == 0
    assert out.exists()


@pytest.mark.parametrize("fmt", ["adq", "int8"])
def test_cli_refuses_opset_with_a_non_standard_format(fmt, tmp_path):
    args = [checkpoint_path("test_model"), "-o", tmp_path / "m.onnx", "--format", fmt]
    result = invoke([*args, "--opset", "21"])
    assert_one_error_line(result, "--opset applies to the standard format only")
    assert not (tmp_path / "m.onnx").exists()
    # checked before the checkpoint is even read
    result = invoke([tmp_path / "missing.pt", "--format", fmt, "--opset", "21"])
    assert_one_error_line(result, "--opset applies to the standard format only")


@pytest.mark.parametrize("fmt", ["standard", "int8"])
def test_cli_refuses_int_codebooks_with_another_format(fmt, tmp_path):
    args = [checkpoint_path("test_model"), "-o", tmp_path / "m.onnx", "--format", fmt]
    assert_one_error_line(invoke([*args, "--int-codebooks"]), "adq format only")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_int_codebooks(factory_checkpoint, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # the factory 'tests.export_helpers' is importable
    for nchw in (False, True):
        out = tmp_path / "m.onnx"
        args = [factory_checkpoint, "--allow-import", "-o", out, "--int-codebooks"]
        result = invoke(args + (["--nchw"] if nchw else []))
        assert result.exit_code == 0, (result.output, result.exception)
        model = onnx.load(str(out))
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["adq.format"] == "adq" and meta["adq.int_codebooks"] == "true"
        convs = [n for n in model.graph.node if n.op_type in ("LutConv", "LutConvQuant")]
        last = [
            a.i for n in convs for a in n.attribute if a.name == "channels_last"
        ]  # every convolution channels last, or none
        assert convs and last == ([] if nchw else [1] * len(convs))
        assert any(n.op_type == "Transpose" for n in model.graph.node) != nchw


def test_cli_refuses_nchw_without_int_codebooks(tmp_path):
    args = [checkpoint_path("test_model"), "-o", tmp_path / "m.onnx", "--nchw"]
    assert_one_error_line(invoke(args), "--nchw applies to --int-codebooks only")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("simplify", [True, False])
def test_cli_oldest_opset(tmp_path, simplify):
    """--opset 13, the oldest: the test model keeps an unfolded BatchNormalization, whose
    opset-20 form (training_mode) the writer rewrites."""
    out = tmp_path / "m.onnx"
    args = [checkpoint_path("test_model"), "-o", out, "--format", "standard", "--opset", "13"]
    with registered():
        result = invoke(args + ([] if simplify else ["--no-simplify"]))
    assert result.exit_code == 0, (result.output, result.exception)
    model = onnx.load(str(out))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13)]
    x = case_input("test_model", batch=2, seed=13)
    assert_logits_match(run_onnx(model, x), torch_logits(loaded("test_model")[0].model, x))
    result = invoke([checkpoint_path("test_model"), "--format", "standard", "--opset", "12"])
    assert result.exit_code == 2  # click's range check


# ------------------------------------------------------------------------------------------
# A full-size network.


def test_resnet18_imagenet_export(tmp_path, capsys):
    """ResNet-18, 224x224, 1000 classes, random weights, quantize_model's defaults: the export
    takes seconds (printed, not asserted: see benchmarks/export_time.py) and stays small."""
    with one_thread():
        torch.manual_seed(0)
        model = quantize_model(models.get("resnet18")).eval()
        path = save_checkpoint(model, tmp_path / "r18.pt", input_shape=[3, 224, 224])
        start = time.perf_counter()
        result = export(path, tmp_path / "r18.adq.onnx")
        seconds = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\n[resnet18 224x224 adq export: {seconds:.1f} s, {result.size_bytes:,} bytes, "
            f"{result.size_bytes / result.fp32_size_bytes:.3f} x fp32]"
        )
    assert len(result.folded.layers) == 19  # 16 body convs + 3 projections; stem, fc float
    assert {lay.bits for lay in result.folded.layers.values()} == {4}
    model_proto = onnx.load(str(result.path), load_external_data=False)
    inits = initializers(model_proto)
    for name, layer in result.folded.layers.items():
        assert inits[f"{name}.codes"].dims[1] == -(-layer.codes[0].size * 4 // 8)
    state = model.state_dict()
    unquantized = sum(state[k].numel() * 4 for k in ("conv1.weight", "fc.weight", "fc.bias")) + sum(
        2 * 4 * lay.out_channels for lay in result.folded.layers.values()
    )
    assert result.size_bytes <= size_bound(4.0, result.fp32_size_bytes, unquantized)
    assert os.path.getsize(result.path) == result.size_bytes


def test_compact_names_never_reuse_a_kept_name():
    """onnxsim leaves initializers named like 'v3' (folded values keep their names): the short
    names handed to intermediate values must avoid them (else the graph is not SSA)."""
    from onnx import helper

    from exporters.graph import compact_names

    nodes = [
        helper.make_node("Add", ["input", "v0"], ["long/name/a"]),
        helper.make_node("Relu", ["long/name/a"], ["long/name/b"]),
        helper.make_node("Add", ["long/name/b", "v1"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(np.ones(1, np.float32), n) for n in ("v0", "v1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    compact_names(model)
    outputs = [o for n in model.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs) and not {"v0", "v1"} & set(outputs)
    assert outputs[-1] == "logits"
    onnx.checker.check_model(model, full_check=True)
