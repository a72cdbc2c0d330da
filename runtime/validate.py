"""adq-validate: accuracy, logit and latency parity of an ONNX export with its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm import tqdm

from adq_deploy.atomic import atomic_write
from adq_deploy.checkpoint import load_checkpoint
from adq_deploy.data import make_loaders
from adq_deploy.quant import N2UQ

from .library import make_session


@dataclass
class Thresholds:
    """Parity gates: below min_agreement (%) or above max_logit_error (ratio) fails."""

    min_agreement: float = 99.9
    max_logit_error: float = 1e-4  # mean |onnx - torch| / mean |torch logit|, flips excluded
    max_accuracy_drop: float = 0.5  # percentage points, ONNX below PyTorch
    flip_error: float = 1e-3  # a sample whose max logit error exceeds this x mean |logit|
    tie_distance: float = 1e-6  # is explained by an activation this close to a threshold


@dataclass
class Report:
    """Everything adq-validate measured; written as JSON."""

    model: str
    checkpoint: str
    format: str
    samples: int
    torch_top1: float
    onnx_top1: float
    agreement: float
    max_abs_logit_error: float
    mean_abs_logit_error: float
    mean_abs_logit: float
    mean_abs_logit_error_no_flips: float
    flip_samples: int
    unexplained_flips: list[int]
    disagreements: list[dict[str, Any]]
    latency_ms: dict[str, dict[str, float]]
    throughput_ips: dict[str, dict[str, float]]
    file_size_bytes: int
    session_peak_rss_mb: dict[str, float]
    thresholds: dict[str, float]
    # "checkpoint", or "snapped" for exports with snapped codebooks (int8, adq --int-codebooks):
    # parity is then measured against the checkpoint's model with those codebooks, and the
    # accuracy gate against the checkpoint's own accuracy (original_top1).
    reference: str = "checkpoint"
    original_top1: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def model_format(model: onnx.ModelProto) -> str:
    """The export format recorded in the metadata (adq, standard, int8), or 'onnx'."""
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("adq.format", "onnx")


def snapping_ranges(snapping: str, model_path: str | Path) -> dict[str, int]:
    """Each layer's integer range from an export's `adq.snapping` metadata (JSON)."""
    try:
        return {name: int(row["qmax"]) for name, row in json.loads(snapping).items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"{model_path}: malformed adq.snapping metadata") from None


def logits_and_tie_distance(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and, per sample, the smallest relative distance of any N2UQ input to a threshold.

    A sample whose ONNX logits differ by more than float rounding is explained when one of its
    activations lies within rounding distance of a threshold: a different summation order
    puts it on the other side, one level up or down, and the change propagates.
    """
    dist = torch.full((x.shape[0],), float("inf"))

    def hook(module: N2UQ, inputs: tuple[torch.Tensor, ...]) -> None:
        xs = module.scale_in() * inputs[0]
        t = module.thresholds()
        d = (xs.unsqueeze(-1) - t).abs().amin(-1) / t.abs().clamp_min(1.0).max()
        dist.copy_(torch.minimum(dist, d.reshape(d.shape[0], -1).amin(1)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, N2UQ)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits.numpy(), dist.numpy()


def _percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90))}


def time_calls(fn, runs: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def session_peak_rss_mb(path: str | Path, fmt: str, batch: int, shape: list[int]) -> float:
    """Peak RSS (MB) a fresh process gains by creating the session and running one batch."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "runtime.memprobe", str(path), fmt, str(batch), *map(str, shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def validate(
    model_path: str | Path,
    checkpoint: str | Path,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    samples: int | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    latency_runs: int = 30,
    thresholds: Thresholds | None = None,
    threads: int | None = None,
    progress: bool = True,
    allow_import: bool = False,
) -> Report:
    """Run the PyTorch model and the ONNX model on the same test images and compare."""
    thresholds = thresholds or Thresholds()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ValueError(f"{model_path}: no such file")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several kinds
        raise ValueError(f"{model_path}: not an ONNX model ({type(e).__name__})") from None
    fmt = model_format(proto)
    ck = load_checkpoint(checkpoint, allow_import=allow_import)
    torch_model = ck.model.eval()
    snapping = {p.key: p.value for p in proto.metadata_props}.get("adq.snapping")
    original_model = None
    if snapping:  # compare with the codebooks the export snapped; accuracy also vs the original
        from exporters.fold import fold
        from exporters.write_int8 import snapped_model

        qmax = snapping_ranges(snapping, model_path)
        original_model, torch_model = torch_model, snapped_model(ck, fold(ck), qmax)
    if threads:
        torch.set_num_threads(threads)
    sess = make_session(model_path, fmt, threads)
    input_name = sess.get_inputs()[0].name
    _, loader, _ = make_loaders(dataset, data_dir, 256, test_limit=samples, augment=False)

    t_logits, o_logits, labels, dists, orig_correct = [], [], [], [], 0
    # disable=None: no bar when stderr is not a terminal (CI logs)
    bar = tqdm(loader, desc="parity", disable=None if progress else True, leave=False)
    for x, y in bar:
        t, d = logits_and_tie_distance(torch_model, x)
        if original_model is not None:
            with torch.no_grad():
                orig_correct += int((original_model(x).argmax(1) == y).sum())
        t_logits.append(t)
        o_logits.append(sess.run(None, {input_name: x.numpy()})[0])
        labels.append(y.numpy())
        dists.append(d)
    t_all, o_all, y_all = np.concatenate(t_logits), np.concatenate(o_logits), np.concatenate(labels)
    dist_all = np.concatenate(dists)
    err = np.abs(o_all - t_all)
    mean_abs_logit = float(np.abs(t_all).mean())
    flipped = err.max(1) > thresholds.flip_error * mean_abs_logit
    explained = dist_all <= thresholds.tie_distance
    disagreements = []
    for i in np.flatnonzero(t_all.argmax(1) != o_all.argmax(1)):
        top2 = np.sort(t_all[i])[-2:]
        disagreements.append(
            {
                "index": int(i),
                "label": int(y_all[i]),
                "torch": int(t_all[i].argmax()),
                "onnx": int(o_all[i].argmax()),
                "torch_top2_margin": float(top2[1] - top2[0]),
                "min_threshold_distance": float(dist_all[i]),
                "explained": bool(explained[i]),
            }
        )

    shape = list(ck.input["shape"])
    latency, throughput, memory = {}, {}, {}
    for b in batch_sizes:
        x = torch.rand(b, *shape)
        xn = x.numpy()
        with torch.no_grad():
            t_times = time_calls(lambda x=x: torch_model(x), latency_runs)
        o_times = time_calls(lambda xn=xn: sess.run(None, {input_name: xn}), latency_runs)
        latency[str(b)] = {
            **{f"torch_{k}": v for k, v in _percentiles(t_times).items()},
            **{f"onnx_{k}": v for k, v in _percentiles(o_times).items()},
        }
        throughput[str(b)] = {
            "torch": b / float(np.median(t_times)),
            "onnx": b / float(np.median(o_times)),
        }
        memory[str(b)] = session_peak_rss_mb(model_path, fmt, b, shape)

    n = len(y_all)
    report = Report(
        model=str(model_path),
        checkpoint=str(checkpoint),
        format=fmt,
        samples=n,
        torch_top1=100.0 * float((t_all.argmax(1) == y_all).mean()),
        onnx_top1=100.0 * float((o_all.argmax(1) == y_all).mean()),
        agreement=100.0 * float((t_all.argmax(1) == o_all.argmax(1)).mean()),
        max_abs_logit_error=float(err.max()),
        mean_abs_logit_error=float(err.mean()),
        mean_abs_logit=mean_abs_logit,
        mean_abs_logit_error_no_flips=float(err[~flipped].mean()) if (~flipped).any() else 0.0,
        flip_samples=int(flipped.sum()),
        unexplained_flips=[int(i) for i in np.flatnonzero(flipped & ~explained)],
        disagreements=disagreements,
        latency_ms=latency,
        throughput_ips=throughput,
        file_size_bytes=model_path.stat().st_size,
        session_peak_rss_mb=memory,
        thresholds=asdict(thresholds),
        reference="snapped" if snapping else "checkpoint",
        original_top1=100.0 * orig_correct / n if snapping else None,
    )
    report.failures = check(report, thresholds)
    return report


def check(report: Report, thresholds: Thresholds) -> list[str]:
    """The parity gates a report fails, one line each."""
    failures = []
    if report.agreement < thresholds.min_agreement:
        failures.append(f"top-1 agreement {report.agreement:.3f}% < {thresholds.min_agreement}%")
    ratio = report.mean_abs_logit_error_no_flips / max(report.mean_abs_logit, 1e-12)
    if ratio > thresholds.max_logit_error:
        failures.append(
            f"mean logit error (level flips excluded) {ratio:.2e} x mean |logit| > "
            f"{thresholds.max_logit_error}"
        )
    if report.unexplained_flips:
        failures.append(
            f"{len(report.unexplained_flips)} samples differ by more than rounding without an "
            f"activation on a threshold (e.g. #{report.unexplained_flips[0]})"
        )
    base = report.torch_top1 if report.original_top1 is None else report.original_top1
    drop = base - report.onnx_top1
    if drop > thresholds.max_accuracy_drop:
        failures.append(
            f"ONNX accuracy {drop:.2f} points below PyTorch > {thresholds.max_accuracy_drop}"
        )
    return failures


def format_report(report: Report) -> str:
    """The table adq-validate prints."""
    lines = [
        f"model {report.model} ({report.format}, {report.file_size_bytes:,} bytes) vs "
        f"{report.checkpoint} on {report.samples} test images",
        f"{'':<28}{'PyTorch':>12}{'ONNX':>12}",
        f"{'top-1 accuracy (%)':<28}{report.torch_top1:>12.2f}{report.onnx_top1:>12.2f}",
    ]
    if report.original_top1 is not None:
        lines.append(
            "(PyTorch here: the checkpoint's model with the export's snapped codebooks; "
            f"the checkpoint itself: {report.original_top1:.2f}%)"
        )
    lines += [
        f"top-1 agreement {report.agreement:.2f}% ({len(report.disagreements)} disagreements, "
        f"{sum(d['explained'] for d in report.disagreements)} explained by a threshold tie)",
        f"logit error: max {report.max_abs_logit_error:.3g}, mean "
        f"{report.mean_abs_logit_error:.3g} (mean |logit| {report.mean_abs_logit:.3g})",
        f"level flips: {report.flip_samples} samples differ by more than rounding, "
        f"{report.flip_samples - len(report.unexplained_flips)} explained by an activation within "
        f"{report.thresholds['tie_distance']:g} of a threshold; mean logit error without them "
        f"{report.mean_abs_logit_error_no_flips:.3g}",
        f"{'batch':<8}{'torch p50 ms':>14}{'torch p90':>11}{'onnx p50 ms':>13}{'onnx p90':>10}"
        f"{'onnx img/s':>12}{'session MB':>12}",
    ]
    for b, lat in report.latency_ms.items():
        lines.append(
            f"{b:<8}{lat['torch_p50']:>14.2f}{lat['torch_p90']:>11.2f}{lat['onnx_p50']:>13.2f}"
            f"{lat['onnx_p90']:>10.2f}{report.throughput_ips[b]['onnx']:>12.0f}"
            f"{report.session_peak_rss_mb[b]:>12.1f}"
        )
    lines.append("PASS" if report.passed else "FAIL: " + "; ".join(report.failures))
    return "\n".join(lines)


def write_report(report: Report, path: str | Path) -> None:
    """The JSON report, written atomically."""
    text = json.dumps({**asdict(report), "passed": report.passed}, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()))
