"""adq-validate: the report's numbers, the parity gates and the exit codes."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from export_helpers import skip_if_onnxruntime_too_old

from adq_deploy import models
from adq_deploy.checkpoint import save_checkpoint
from adq_deploy.cli import validate_main
from adq_deploy.quant import QuantConfig, quantize_model
from exporters.export import export
from runtime.validate import Report, Thresholds, check, model_format, snapping_ranges

META = {"input_shape": [1, 28, 28], "mean": [0.2860406], "std": [0.3530242]}
FAST = ["--samples", "128", "--batch-sizes", "1,4", "--latency-runs", "2", "--no-progress"]


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    m = quantize_model(models.get("small_cnn", width=8), QuantConfig(w_bits=4, a_bits=4))
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.train()
    for i in range(4):
        x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) * 2 - 0.8
        loss = torch.nn.functional.cross_entropy(m(x), torch.arange(16) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_checkpoint(m.eval(), path, **META)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    ck = _checkpoint(d / "a.pt", 0)
    other = _checkpoint(d / "b.pt", 1)
    onnx_paths = {fmt: export(ck, d / f"a.{fmt}.onnx", fmt=fmt).path for fmt in ("adq", "standard")}
    onnx_paths["int8"] = export(ck, d / "a.int8.onnx", fmt="int8").path
    onnx_paths["adq-int"] = export(ck, d / "a.adq-int.onnx", fmt="adq", int_codebooks=True).path
    return ck, other, onnx_paths


@pytest.mark.parametrize("fmt", ["adq", "standard"])
def test_report_and_pass(exported, tmp_path, fmt):
    ck, _, paths = exported
    skip_if_onnxruntime_too_old(paths[fmt])
    report_path = tmp_path / "r.json"
    args = [
        str(paths[fmt]),
        "--checkpoint",
        str(ck),
        *FAST,
        "--report",
        str(report_path),
        "--min-agreement",
        "95",
        "--max-logit-error",
        "0.05",
    ]
    result = CliRunner().invoke(validate_main, args)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    r = json.loads(report_path.read_text())
    assert r["format"] == fmt and r["samples"] == 128 and r["passed"] is True
    assert r["agreement"] >= 95 and r["max_abs_logit_error"] >= r["mean_abs_logit_error"] >= 0
    assert set(r["latency_ms"]) == {"1", "4"}
    assert all(v > 0 for lat in r["latency_ms"].values() for v in lat.values())
    assert all(v > 0 for v in r["session_peak_rss_mb"].values())
    assert r["file_size_bytes"] == paths[fmt].stat().st_size
    assert abs(r["torch_top1"] - r["onnx_top1"]) <= 100 - r["agreement"] + 1e-9


@pytest.mark.parametrize("name", ["int8", "adq-int"])
def test_snapped_exports_compare_with_the_snapped_model(exported, tmp_path, name):
    """int8 and adq --int-codebooks: parity against the checkpoint's model with the snapped
    codebooks (tight gates), accuracy also against the checkpoint itself."""
    ck, _, paths = exported
    skip_if_onnxruntime_too_old(paths[name])
    report_path = tmp_path / "r.json"
    args = [str(paths[name]), "--checkpoint", str(ck), *FAST, "--report", str(report_path)]
    result = CliRunner().invoke(validate_main, args)
    assert result.exit_code == 0, result.output
    r = json.loads(report_path.read_text())
    assert r["reference"] == "snapped" and r["original_top1"] is not None
    assert r["agreement"] >= 99.9 and not r["unexplained_flips"]
    assert r["mean_abs_logit_error_no_flips"] <= 1e-4 * r["mean_abs_logit"]
    assert "snapped codebooks" in result.output


def test_unsnapped_exports_compare_with_the_checkpoint(exported, tmp_path):
    ck, _, paths = exported
    report_path = tmp_path / "r.json"
    args = [str(paths["adq"]), "--checkpoint", str(ck), *FAST, "--report", str(report_path)]
    CliRunner().invoke(validate_main, args)
    r = json.loads(report_path.read_text())
    assert r["reference"] == "checkpoint" and r["original_top1"] is None


def test_wrong_checkpoint_fails_the_gate(exported):
    ck, other, paths = exported
    skip_if_onnxruntime_too_old(paths["standard"])
    result = CliRunner().invoke(
        validate_main, [str(paths["standard"]), "--checkpoint", str(other), *FAST]
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_bad_input_exits_2(exported, tmp_path):
    ck, _, paths = exported
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not onnx")
    future = onnx.load(str(paths["standard"]))
    future.ir_version = 99  # valid protobuf that no onnxruntime loads
    onnx.save(future, tmp_path / "future.onnx")
    for model in (tmp_path / "missing.onnx", junk, tmp_path / "future.onnx"):
        result = CliRunner().invoke(validate_main, [str(model), "--checkpoint", str(ck), *FAST])
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:")


def test_gates():
    base = dict(
        model="m",
        checkpoint="c",
        format="adq",
        samples=10,
        torch_top1=90.0,
        onnx_top1=90.0,
        agreement=100.0,
        max_abs_logit_error=0.0,
        mean_abs_logit_error=1e-6,
        mean_abs_logit=1.0,
        mean_abs_logit_error_no_flips=1e-6,
        flip_samples=0,
        unexplained_flips=[],
        disagreements=[],
        latency_ms={},
        throughput_ips={},
        file_size_bytes=1,
        session_peak_rss_mb={},
        thresholds={},
    )
    assert check(Report(**base), Thresholds()) == []
    assert len(check(Report(**{**base, "agreement": 99.0}), Thresholds())) == 1
    flips = {"mean_abs_logit_error": 1e-3, "flip_samples": 3}
    assert check(Report(**{**base, **flips}), Thresholds()) == []  # explained flips only
    assert len(check(Report(**{**base, "mean_abs_logit_error_no_flips": 1e-3}), Thresholds())) == 1
    assert len(check(Report(**{**base, **flips, "unexplained_flips": [7]}), Thresholds())) == 1
    assert len(check(Report(**{**base, "onnx_top1": 80.0}), Thresholds())) == 1
    # snapped exports: the accuracy gate is against the checkpoint's own accuracy
    snapped = {**base, "reference": "snapped", "original_top1": 91.0}
    assert len(check(Report(**snapped), Thresholds())) == 1  # 1 point below the checkpoint
    assert check(Report(**{**snapped, "original_top1": 90.4}), Thresholds()) == []


def test_model_format_reads_metadata(exported):
    import onnx

    _, _, paths = exported
    assert model_format(onnx.load(str(paths["adq"]))) == "adq"


def test_snapping_ranges_read_the_metadata():
    """Each layer's integer range for the snapped reference comes from the export itself (the
    int8 format and --int-codebooks snap 8-bit-input layers differently); malformed metadata is
    a one-line error."""
    meta = json.dumps({"conv1": {"qmax": 127, "weight_scale": 0.1}, "fc": {"qmax": 64}})
    assert snapping_ranges(meta, "m.onnx") == {"conv1": 127, "fc": 64}
    for bad in ("not json", "[1, 2]", json.dumps({"fc": {"scale": 1}}), json.dumps({"fc": 3})):
        with pytest.raises(ValueError, match="m.onnx: malformed adq.snapping"):
            snapping_ranges(bad, "m.onnx")
