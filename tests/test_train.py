"""adq-train end to end on a slice of real Fashion-MNIST (seconds), and its pieces."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from adq_deploy.checkpoint import load_checkpoint
from adq_deploy.cli import train_main
from adq_deploy.data import make_loaders
from adq_deploy.quant import average_bits
from adq_deploy.train import TrainArgs, evaluate, kd_loss

QUICK = [
    "--model",
    "small_cnn",
    "--model-kwargs",
    '{"width": 8}',
    "--train-limit",
    "1024",
    "--test-limit",
    "256",
    "--fp32-epochs",
    "2",
    "--qat-epochs",
    "1",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--sensitivity-batches",
    "1",
    "--no-progress",
    "--no-compile",
    "--avg-bits",
    "2.5",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ck.pt"
    result = CliRunner().invoke(train_main, ["-o", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    return out, result


def test_train_writes_checkpoint_with_metrics(trained):
    out, result = trained
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    ck = load_checkpoint(out)
    assert out.with_name("ck.fp32.pt").exists() and not out.with_name("ck.resume.pt").exists()
    avg = average_bits(ck.model)
    assert avg.param_weighted <= 2.5 + 1e-9
    assert ck.metrics["avg_bits_param_weighted"] == pytest.approx(avg.param_weighted)
    assert {e["w_bits"] for e in ck.layers.values() if e["role"] == "body"} <= {2, 3, 4}
    assert ck.provenance["command"].startswith("adq-train")
    assert ck.provenance["train_args"]["avg_bits"] == 2.5
    assert ck.metrics["allocation"]["allocation"] == "sensitivity"
    # The recorded accuracy is reproduced by evaluating the reloaded checkpoint.
    _, test_loader, _ = make_loaders("fashion-mnist", None, 64, test_limit=256, augment=False)
    top1 = evaluate(ck.model, test_loader, torch.device("cpu"))
    assert top1 == pytest.approx(ck.metrics["adq_top1"])
    assert top1 == pytest.approx(summary["adq_top1"])
    assert top1 > 20.0  # ten classes: clearly above chance after a few hundred steps


def test_train_is_seeded(trained, tmp_path):
    out, _ = trained
    again = tmp_path / "again.pt"
    result = CliRunner().invoke(train_main, ["-o", str(again), *QUICK])
    assert result.exit_code == 0, result.output
    a, b = load_checkpoint(out).model.state_dict(), load_checkpoint(again).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_from_teacher_and_ablation_switches(trained, tmp_path):
    out, _ = trained
    teacher = str(out.with_name("ck.fp32.pt"))
    ab = tmp_path / "ab.pt"
    args = [
        *QUICK,
        "--teacher",
        teacher,
        "--act",
        "lsq",
        "--no-ema",
        "--w-init",
        "uniform",
        "--allocation",
        "fixed",
        "--w-bits",
        "3",
        "--edge-bits",
        "8",
        "--input-bits",
        "8",
    ]
    result = CliRunner().invoke(train_main, ["-o", str(ab), *args])
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(ab)
    body = [e for e in ck.layers.values() if e["role"] == "body"]
    assert {e["w_bits"] for e in body} == {3} and {e["act"] for e in body} == {"lsq"}
    assert {e["w_init"] for e in body} == {"uniform"} and ck.quant_config.ema is False
    assert ck.metrics["fp32_top1"] == load_checkpoint(teacher).metrics["fp32_top1"]
    # W8A8 edges, the first one on the quantized network input, calibrated by QAT's first batch
    first = next(n for n, e in ck.layers.items() if e["role"] == "first")
    assert ck.layers[first]["act"] == "inputquant" and ck.layers[first]["w_bits"] == 8
    assert ck.quant_config.edge_bits == 8 and ck.quant_config.input_bits == 8
    quant = ck.model.get_submodule(first).act_quant
    assert bool(quant.initialized) and 0 < int(quant.zero_point) < 255 and quant.step() < 0.1
    assert ck.metrics["adq_top1"] > 20.0


def test_resume_continues_after_last_epoch(tmp_path):
    out = tmp_path / "r.pt"
    base = list(QUICK)
    # A finished fp32 stage followed by an interrupted QAT stage: simulate with --qat-epochs 0
    # then resume with the real count.
    first = CliRunner().invoke(train_main, ["-o", str(out), *base, "--qat-epochs", "0"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(train_main, ["-o", str(out), *base, "--resume"])
    assert second.exit_code == 0, second.output
    assert "resumed teacher" in second.output
    assert load_checkpoint(out).metrics["history"]["qat"]


def test_bad_input_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(
        train_main, ["-o", str(tmp_path / "x.pt"), *QUICK, "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "dataset-fashion-mnist" in lines[0]
    result = CliRunner().invoke(train_main, ["-o", str(tmp_path / "x.pt"), "--avg-bits", "1.5"])
    assert result.exit_code == 2 and "below the smallest choice" in result.output
    result = CliRunner().invoke(train_main, ["-o", str(tmp_path / "x.pt"), "--input-bits", "8"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert result.output.startswith("error:") and "add --edge-bits 8" in result.output
    assert not (tmp_path / "x.pt").exists()


def test_kd_loss_matches_definition():
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    temp = 3.0
    p = F.softmax(t / temp, 1)
    expected = (p * (p.log() - F.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    assert torch.allclose(kd_loss(s, t, temp), expected, atol=1e-6)
    assert kd_loss(t, t, temp).abs() < 1e-6


def test_train_args_validation():
    with pytest.raises(ValueError, match="allocation"):
        TrainArgs(allocation="magic")


def test_torchrun_data_parallel(tmp_path):
    """Two gloo processes on the CPU: same allocation on both ranks, one checkpoint from rank 0."""
    import subprocess
    import sys

    out = tmp_path / "ddp.pt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = [a for a in QUICK if a not in ("--avg-bits", "2.5")]
    cmd = [*torchrun, "-m", "adq_deploy.cli", "train", "-o", str(out), *args, "--qat-epochs", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ck = load_checkpoint(out)
    assert ck.metrics["history"]["qat"] and average_bits(ck.model).param_weighted <= 2.81 + 1e-9
    assert ck.provenance["train_args"]["avg_bits"] == 2.81


def test_no_hessian_allocation(trained, tmp_path):
    out, _ = trained
    nh = tmp_path / "nh.pt"
    args = [*QUICK, "--teacher", str(out.with_name("ck.fp32.pt")), "--allocation", "no-hessian"]
    result = CliRunner().invoke(train_main, ["-o", str(nh), *args])
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(nh)
    alloc = ck.metrics["allocation"]
    assert alloc["allocation"] == "no-hessian" and set(alloc["traces"].values()) == {1.0}
    assert average_bits(ck.model).param_weighted <= 2.5 + 1e-9
