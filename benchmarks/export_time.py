"""How long adq-export takes, step by step: fold and each writer, for ResNet-18 and ResNet-20.

    python benchmarks/export_time.py [--repeat 3] [--threads N] [--models resnet18,resnet20]

Builds each network with random weights and quantize_model's defaults (W4A4 ADQ, float first
and last layer), saves a checkpoint in a temporary folder, then times (best of --repeat):
load_checkpoint, fold (skeleton trace + codes + BN absorption), each writer on the folded
model, onnxsim for the standard and int8 graphs, the fp32 size baseline, and the whole
export() per format. Prints a Markdown table (seconds) and the file sizes.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adq_deploy import models
from adq_deploy.checkpoint import load_checkpoint, save_checkpoint
from adq_deploy.quant import quantize_model
from exporters.export import build_model, export, fp32_onnx, simplify
from exporters.fold import fold

SPECS = {  # name -> (registry kwargs, input shape)
    "resnet18": ({"num_classes": 1000, "in_channels": 3}, [3, 224, 224]),
    "resnet20": ({"num_classes": 10, "in_channels": 3}, [3, 32, 32]),
}
FORMATS = ("adq", "standard", "int8")


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Smallest wall time of `repeat` runs, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench(name: str, folder: Path, repeat: int) -> tuple[dict[str, float], dict[str, int]]:
    kwargs, shape = SPECS[name]
    torch.manual_seed(0)
    model = quantize_model(models.get(name, **kwargs)).eval()
    path = save_checkpoint(model, folder / f"{name}.pt", input_shape=shape)
    times: dict[str, float] = {}
    sizes: dict[str, int] = {}
    times["load"], ck = best_of(repeat, lambda: load_checkpoint(path))
    times["fold"], folded = best_of(repeat, lambda: fold(ck))
    built = {}
    for fmt in FORMATS:
        times[f"write {fmt}"], built[fmt] = best_of(repeat, lambda f=fmt: build_model(folded, f))
    for fmt in ("standard", "int8"):
        times[f"onnxsim {fmt}"], _ = best_of(repeat, lambda f=fmt: simplify(built[f]))
    times["fp32 baseline"], _ = best_of(repeat, lambda: fp32_onnx(ck))
    for fmt in FORMATS:
        out = folder / f"{name}.{fmt}.onnx"
        times[f"export() {fmt}"], result = best_of(repeat, lambda f=fmt, o=out: export(path, o, f))
        sizes[fmt] = result.size_bytes
        sizes["fp32"] = result.fp32_size_bytes
    sizes["params"] = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    sizes["adq layers"] = len(folded.layers)
    return times, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--models", default="resnet18,resnet20")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="adq-export-bench-") as tmp:
        for name in names:
            results[name] = bench(name, Path(tmp), args.repeat)
    steps = list(next(iter(results.values()))[0])
    cpu = platform.processor() or platform.machine()
    print(
        f"\nexport time, best of {args.repeat}, seconds ({cpu}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} on {torch.get_num_threads()} threads)\n"
    )
    header = ["step"] + [f"{n} {'x'.join(map(str, SPECS[n][1]))}" for n in names]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * len(names)) + "|")
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{results[n][0][step]:.3f}" for n in names) + " |")
    print()
    print("| model | weights | ADQ layers | fp32 ONNX | adq | standard | int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        s = results[n][1]
        print(
            f"| {n} | {s['params']:,} | {s['adq layers']} | {s['fp32']:,} | "
            + " | ".join(f"{s[f]:,} ({s[f] / s['fp32']:.3f})" for f in FORMATS)
            + " |"
        )


if __name__ == "__main__":
    main()
