"""Inference latency, file size and session memory of one network in seven forms, side by side.

    python benchmarks/latency.py [--checkpoint CKPT]
        [--models fmnist,resnet18[,resnet18-int8-edges]] [--batch-sizes 1,32]
        [--threads 2] [--rounds 5] [--runs 6] [--settle 0.5]
        [--resnet18-size 224] [--keep DIR] [--out runs/bench/latency.json]

For each model (the Fashion-MNIST ResNet-20 checkpoint, and a ResNet-18 with 1000 classes and
random weights, quantized W3A2 and saved as a checkpoint in a temporary folder; on request the
same ResNet-18 with W8A8 first and last layers on an 8-bit quantized input, `resnet18-int8-edges`,
the integer first layer onnxruntime's QDQ model also has) it measures:

  eager     PyTorch eager of the quantized model (fake quantization, torch.no_grad)
  fp32      the fp32 ONNX of the same network (exporters.export.fp32_onnx) in onnxruntime
  ort-int8  onnxruntime's own static int8 quantization of that fp32 model (QDQ, per-channel
            QInt8 weights, QUInt8 activations, calibrated on 32 inputs)
  adq       our adq format (ai.adq op library)
  adq-int   our adq format with --int-codebooks (the op library's exact int8 kernel)
  standard  our standard format (standard ONNX ops only)
  int8      our int8 format

All at the same thread count. The variants are timed round-robin (each round times `runs` calls
of every variant, after a `settle` pause, in an order rotated from round to round), so
background load falls on all of them alike; p50 / p90 are over all timed calls. Peak memory is
measured in a fresh process per variant (runtime.memprobe for the ONNX sessions; the same VmHWM
method for eager).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from adq_deploy import models  # noqa: E402
from adq_deploy.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from adq_deploy.quant import N2UQ, QuantConfig, quantize_model  # noqa: E402
from benchmarks.machine import machine_info, machine_line  # noqa: E402
from runtime.validate import time_calls  # noqa: E402

VARIANTS = ("eager", "fp32", "ort-int8", "adq", "adq-int", "standard", "int8")
LABELS = {
    "eager": "PyTorch eager (fake-quant)",
    "fp32": "fp32 ONNX (onnxruntime)",
    "ort-int8": "onnxruntime static int8 (QDQ)",
    "adq": "ours: adq (op library)",
    "adq-int": "ours: adq --int-codebooks (op library, int8 kernel)",
    "standard": "ours: standard ONNX",
    "int8": "ours: int8",
}
DEFAULT_CHECKPOINTS = ("examples/fmnist_resnet20_adq.pt", "runs/fmnist/adq-shipped.pt")


# --------------------------------------------------------------------------------------------
# Machine


# --------------------------------------------------------------------------------------------
# Models


def make_resnet18(folder: Path, size: int, seed: int = 0, int8_edges: bool = False) -> Path:
    """ResNet-18 (1000 classes, 3 x size x size), random weights, W3A2, saved as a checkpoint;
    with `int8_edges` its first and last layers W8A8 and the network input on 8-bit levels
    (edge_bits=8, input_bits=8: an integer first layer, as onnxruntime's QDQ model has).

    A few train-mode passes on random data first give the network real batch-norm statistics;
    during the first one each N2UQ's input scale is set from its input (99th percentile at the
    top segment end), so the activation levels are all in use rather than degenerate (and the
    input quantizer takes its range from that batch).
    """
    torch.manual_seed(seed)
    model = models.get("resnet18", num_classes=1000, in_channels=3)
    edges = {"edge_bits": 8, "input_bits": 8} if int8_edges else {}
    quantize_model(model, QuantConfig(w_bits=3, a_bits=2, **edges))
    shape = (3, size, size)
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def calibrate(module: N2UQ, inputs: tuple[torch.Tensor, ...]) -> None:
        top = float(module.segment_ends()[-1])
        p99 = float(torch.quantile(inputs[0].detach().reshape(-1)[:1_000_000].float(), 0.99))
        module.alpha1.data.fill_(top / max(p99, 1e-3))

    model.train()
    with torch.no_grad():
        handles = [
            m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, N2UQ)
        ]
        try:
            model(torch.randn(8, *shape, generator=gen))
        finally:
            for h in handles:
                h.remove()
        for bn in bns:  # cumulative averages over the passes below
            bn.reset_running_stats()
            bn.momentum = None
        for _ in range(4):
            model(torch.randn(8, *shape, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
    model.eval()
    path = folder / f"resnet18_{size}_w3a2{'_int8edges' if int8_edges else ''}.pt"
    save_checkpoint(
        model,
        path,
        input_shape=shape,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        command="benchmarks/latency.py (random weights)",
    )
    return path


def default_checkpoint() -> Path | None:
    for c in DEFAULT_CHECKPOINTS:
        if (ROOT / c).is_file():
            return ROOT / c
    return None


def sample_inputs(ck, dataset: str, n: int, seed: int) -> tuple[np.ndarray, str]:
    """n inputs for calibration and timing: real test images where the dataset is there."""
    shape = list(ck.input["shape"])
    if dataset == "auto":
        trained_on = (ck.provenance.get("train_args") or {}).get("dataset")
        dataset = trained_on or ("fashion-mnist" if shape == [1, 28, 28] else "random")
    if dataset != "random":
        try:
            from adq_deploy.data import make_loaders

            _, loader, _ = make_loaders(dataset, None, n, test_limit=n, augment=False, seed=seed)
            x = next(iter(loader))[0].numpy().astype(np.float32)
            if list(x.shape[1:]) == shape and len(x) == n:
                return np.ascontiguousarray(x), f"{dataset} test images"
        except Exception as e:  # noqa: BLE001 - fall back to random data, and say so
            click.echo(f"  ({dataset} data unavailable: {e}; using random inputs)", err=True)
    gen = np.random.default_rng(seed)
    return gen.standard_normal((n, *shape)).astype(np.float32), "random N(0,1) inputs"


# --------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    name: str
    path: Path  # the file that is deployed (the checkpoint for eager)
    mem_fmt: str  # memprobe format: 'adq', 'onnx', or 'torch' (eager)
    session: Any = None


def ort_int8(fp32_path: Path, out: Path, calib: np.ndarray) -> Path:
    """onnxruntime's static quantization: quant_pre_process, then QDQ per-channel S8S8/U8."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    return out


def prepare(ck_path: Path, folder: Path, calib: np.ndarray, threads: int) -> dict[str, Variant]:
    """Export every ONNX form of the checkpoint into `folder` and open its session."""
    from exporters.export import export, fp32_onnx, write
    from runtime.library import make_session

    ck = load_checkpoint(ck_path)
    stem = ck_path.stem
    fp32_path = folder / f"{stem}.fp32.onnx"
    write(fp32_onnx(ck), fp32_path)
    out = {
        "eager": Variant("eager", ck_path, "torch", ck.model.eval()),
        "fp32": Variant("fp32", fp32_path, "onnx"),
        "ort-int8": Variant(
            "ort-int8", ort_int8(fp32_path, folder / f"{stem}.ort-int8.onnx", calib), "onnx"
        ),
    }
    for fmt in ("adq", "standard", "int8"):
        res = export(ck_path, folder / f"{stem}.{fmt}.onnx", fmt)
        out[fmt] = Variant(fmt, res.path, "adq" if fmt == "adq" else "onnx")
    res = export(ck_path, folder / f"{stem}.adq-int.onnx", "adq", int_codebooks=True)
    out["adq-int"] = Variant("adq-int", res.path, "adq")
    for v in out.values():
        if v.mem_fmt != "torch":
            v.session = make_session(v.path, v.mem_fmt, threads)
    return {k: out[k] for k in VARIANTS}


def runner(v: Variant, x: np.ndarray):
    """A no-argument callable that runs one batch through the variant; returns the logits."""
    if v.mem_fmt == "torch":
        xt = torch.from_numpy(x)

        def run_torch() -> np.ndarray:
            with torch.no_grad():
                return v.session(xt).numpy()

        return run_torch
    name = v.session.get_inputs()[0].name
    return lambda: v.session.run(None, {name: x})[0]


# --------------------------------------------------------------------------------------------
# Memory


TORCH_PROBE = """
import sys
from pathlib import Path
import torch
from adq_deploy.checkpoint import load_checkpoint

def kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

ckpt, batch, threads, *shape = sys.argv[1:]
torch.set_num_threads(int(threads))
x = torch.zeros(int(batch), *map(int, shape))
Path("/proc/self/clear_refs").write_text("5")
base = kb("VmRSS")
model = load_checkpoint(ckpt).model.eval()
with torch.no_grad():
    model(x)
print(f"{(kb('VmHWM') - base) / 1024:.2f}")
"""


def peak_mb(v: Variant, batch: int, shape: list[int], threads: int) -> float | None:
    """Peak RSS (MB) a fresh process gains by loading the variant and running one batch."""
    from runtime.validate import session_peak_rss_mb

    try:
        if v.mem_fmt != "torch":
            return session_peak_rss_mb(v.path, v.mem_fmt, batch, shape)
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-c", TORCH_PROBE, str(v.path), str(batch), str(threads)]
        res = subprocess.run(
            [*cmd, *map(str, shape)], capture_output=True, text=True, check=True, env=env
        )
        return float(res.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError) as e:
        click.echo(f"  (memory probe of {v.name} failed: {e})", err=True)
        return None


# --------------------------------------------------------------------------------------------
# Timing


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Top-1 agreement (%) of two logit batches."""
    return float(100.0 * np.mean(a.argmax(1) == b.argmax(1)))


def logit_error(a: np.ndarray, b: np.ndarray) -> float:
    """mean |a - b| / mean |b|: how far the logits are from the reference's."""
    return float(np.abs(a - b).mean() / max(float(np.abs(b).mean()), 1e-12))


def measure(
    variants: dict[str, Variant],
    inputs: np.ndarray,
    batch_sizes: list[int],
    rounds: int,
    runs: int,
    warmup: int,
    threads: int,
    shape: list[int],
    memory: bool,
    settle: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Round-robin timing of every variant at every batch size; returns results[batch][name]."""
    results: dict[str, dict[str, Any]] = {}
    for b in batch_sizes:
        x = np.ascontiguousarray(np.resize(inputs, (b, *inputs.shape[1:])))
        fns = {n: runner(v, x) for n, v in variants.items()}
        logits = {n: fn() for n, fn in fns.items()}  # also the first (untimed) call
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {n: [] for n in fns}
        medians: dict[str, list[float]] = {n: [] for n in fns}
        names = list(fns)
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                # Let the previous variant's spinning threads (onnxruntime's pool, PyTorch's
                # OpenMP) go idle first, so that they do not slow this variant's first calls.
                time.sleep(settle)
                ts = time_calls(fns[n], runs, warmup=1)
                times[n].extend(ts)
                medians[n].append(float(np.median(ts)) * 1e3)
        fp32_p50 = float(np.percentile(times["fp32"], 50)) * 1e3
        row: dict[str, Any] = {}
        for n, v in variants.items():
            ms = np.array(times[n]) * 1e3
            ref = {
                "ort-int8": "fp32",
                "adq": "eager",
                "adq-int": "int8",  # the same snapped codebooks
                "standard": "eager",
                "int8": "eager",
            }.get(n)
            row[n] = {
                "label": LABELS[n],
                "p50_ms": float(np.percentile(ms, 50)),
                "p90_ms": float(np.percentile(ms, 90)),
                "min_ms": float(ms.min()),
                "round_medians_ms": medians[n],
                "calls": len(ms),
                "ratio_to_fp32_p50": float(np.percentile(ms, 50)) / fp32_p50,
                "file_bytes": v.path.stat().st_size,
                "peak_mb": peak_mb(v, b, shape, threads) if memory else None,
                "top1_agreement_ref": ref,
                "top1_agreement_pct": None if ref is None else agreement(logits[n], logits[ref]),
                "rel_logit_error": None if ref is None else logit_error(logits[n], logits[ref]),
            }
        results[str(b)] = row
    return results


def markdown(title: str, results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| variant | batch | p50 ms | p90 ms | p50 / fp32 p50 | file bytes | peak MB "
        "| top-1 agree / rel. logit err |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for b, row in results.items():
        for r in row.values():
            mem = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            agree = (
                "-"
                if r["top1_agreement_ref"] is None
                else f"{r['top1_agreement_pct']:.1f}% / {r['rel_logit_error']:.1e} vs "
                f"{r['top1_agreement_ref']}"
            )
            lines.append(
                f"| {r['label']} | {b} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{r['ratio_to_fp32_p50']:.2f}x | {r['file_bytes']:,} | {mem} | {agree} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI


@click.command()
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Fashion-MNIST checkpoint (default: the first of {', '.join(DEFAULT_CHECKPOINTS)}).",
)
@click.option(
    "--models",
    "which",
    default="fmnist,resnet18",
    show_default=True,
    help="Which models to measure: fmnist, resnet18, resnet18-int8-edges.",
)
@click.option("--batch-sizes", default="1,32", show_default=True)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--rounds", default=5, show_default=True, type=int, help="Round-robin rounds.")
@click.option("--runs", default=6, show_default=True, type=int, help="Timed calls per round.")
@click.option("--warmup", default=3, show_default=True, type=int, help="Untimed calls first.")
@click.option(
    "--settle",
    default=0.5,
    show_default=True,
    type=float,
    help="Seconds of pause before each variant's round (spinning threads of the previous "
    "variant go idle).",
)
@click.option("--resnet18-size", default=224, show_default=True, type=int)
@click.option("--calib", default=32, show_default=True, type=int, help="Calibration inputs.")
@click.option(
    "--dataset",
    default="auto",
    show_default=True,
    help="Inputs of the checkpoint model: auto (its training data), a dataset name, or random.",
)
@click.option("--no-memory", is_flag=True, help="Skip the (fresh-process) memory probes.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "runs/bench/latency.json",
    show_default=True,
)
def main(
    checkpoint, which, batch_sizes, threads, rounds, runs, warmup, settle, resnet18_size, calib,
    dataset, no_memory, keep, out,
):  # fmt: skip
    """Latency / size / memory of eager, fp32 ONNX, onnxruntime int8 and our three formats."""
    from runtime.library import build_library

    torch.set_num_threads(threads)
    batches = [int(b) for b in batch_sizes.split(",")]
    wanted = [m.strip() for m in which.split(",") if m.strip()]
    unknown = set(wanted) - {"fmnist", "resnet18", "resnet18-int8-edges"}
    if unknown:
        raise click.BadParameter(f"unknown models {sorted(unknown)}", param_hint="--models")
    info = machine_info(threads)
    click.echo(machine_line(info))
    build_library()

    report: dict[str, Any] = {
        "machine": info,
        "settings": {
            "batch_sizes": batches,
            "threads": threads,
            "rounds": rounds,
            "runs_per_round": runs,
            "warmup": warmup,
            "settle_s": settle,
            "calibration_inputs": calib,
        },
        "models": {},
    }
    tmp = tempfile.TemporaryDirectory(prefix="adq-bench-")
    folder = Path(keep) if keep else Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        jobs = []
        if "fmnist" in wanted:
            ck_path = checkpoint or default_checkpoint()
            if ck_path is None:
                click.echo(
                    f"no checkpoint: none of {', '.join(DEFAULT_CHECKPOINTS)} exists "
                    "(pass --checkpoint); skipping it",
                    err=True,
                )
            else:
                jobs.append(("fmnist", Path(ck_path), dataset))
        for key in ("resnet18", "resnet18-int8-edges"):
            if key not in wanted:
                continue
            int8_edges = key != "resnet18"
            what = "W3A2, W8A8 edges on an 8-bit input" if int8_edges else "W3A2"
            click.echo(f"building ResNet-18 {resnet18_size}x{resnet18_size} {what} ...", err=True)
            ck_path = make_resnet18(folder, resnet18_size, int8_edges=int8_edges)
            jobs.append((key, ck_path, "random"))
        for key, ck_path, data in jobs:
            ck = load_checkpoint(ck_path)
            shape = list(ck.input["shape"])
            inputs, source = sample_inputs(ck, data, max(calib, max(batches)), seed=0)
            click.echo(f"exporting {ck_path.name} ({key}) ...", err=True)
            variants = prepare(ck_path, folder, inputs[:calib], threads)
            t0 = time.perf_counter()
            results = measure(
                variants,
                inputs,
                batches,
                rounds,
                runs,
                warmup,
                threads,
                shape,
                not no_memory,
                settle,
            )
            arch = ck.architecture.get("name", ck.architecture.get("factory"))
            title = f"{key}: {arch} {'x'.join(map(str, shape))} ({ck_path.name}; {source})"
            report["models"][key] = {
                "title": title,
                "checkpoint": str(ck_path),
                "input_shape": shape,
                "inputs": source,
                "seconds": time.perf_counter() - t0,
                "results": results,
            }
            click.echo("")
            click.echo(markdown(title, results))
            click.echo("")
    finally:
        tmp.cleanup()
    report["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}; wrote {out}")


if __name__ == "__main__":
    main()
