"""Time of one training step (forward + backward + SGD step): fp32 vs ADQ-quantized ResNet-20.

    python benchmarks/train_step.py [--batch 128] [--threads 2] [--rounds 5] [--steps 10]
        [--warmup 3] [--w-bits 3] [--a-bits 2] [--out runs/bench/train_step.json]

Three variants of the same ResNet-20 (1 x 28 x 28 inputs, 10 classes, same initial weights):

  fp32        the float network
  adq-eager   quantized with QuantConfig(w_bits, a_bits) (codebook weights, N2UQ activations),
              N2UQ backward in eager PyTorch (fused=False, what adq-train does without --compile)
  adq-fused   the same, N2UQ backward through the torch.compile'd kernel (fused=True)

Each step is what adq-train does per batch: forward, cross-entropy, zero_grad, backward, SGD
(Nesterov momentum 0.9, weight decay on conv/linear weights) and the LR-schedule step, on
pre-generated random batches (no data loading in the timing). The warm-up steps of every variant
are timed separately: the first step of adq-fused includes the torch.compile of the N2UQ
kernel (by default with an empty, temporary inductor cache, i.e. a cold compile). Then the
variants are timed round-robin (`steps` steps of each per round, order rotated every round) so
background load falls on all alike; medians / p90 are over all timed steps.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info  # noqa: E402

VARIANTS = ("fp32", "adq-eager", "adq-fused")


def build_variants(w_bits: int, a_bits: int, seed: int, total_steps: int) -> dict[str, Any]:
    """The three models (same initial weights) with their optimizers and schedules."""
    import copy

    import torch

    from adq_deploy import models
    from adq_deploy.quant import QuantConfig, quantize_model
    from adq_deploy.train import make_optimizer, set_fused

    torch.manual_seed(seed)
    base = models.get("resnet20", num_classes=10, in_channels=1)
    out = {}
    for name in VARIANTS:
        model = copy.deepcopy(base)
        if name != "fp32":
            quantize_model(model, QuantConfig(w_bits=w_bits, a_bits=a_bits))
            set_fused(model, name == "adq-fused")
        model.train()
        opt, sched = make_optimizer(model, lr=0.01, weight_decay=5e-4, steps=total_steps)
        out[name] = (model, opt, sched)
    return out


def make_step(model, opt, sched, batches):
    """A no-argument callable: one training step on the next batch; returns (fwd s, rest s)."""
    import torch.nn.functional as F

    state = {"i": 0}

    def step() -> tuple[float, float]:
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return t1 - t0, time.perf_counter() - t1

    return step


def markdown(rows: dict[str, dict[str, Any]], batch: int, bits: str) -> str:
    lines = [
        f"### ResNet-20 training step, batch {batch} x 1x28x28 ({bits})",
        "",
        "| variant | step p50 ms | step p90 ms | p50 / fp32 | forward p50 ms | backward+SGD p50 ms "
        "| first step s | warm-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['step_p50_ms']:.1f} | {r['step_p90_ms']:.1f} | "
            f"{r['ratio_to_fp32_p50']:.2f}x | {r['forward_p50_ms']:.1f} | "
            f"{r['backward_sgd_p50_ms']:.1f} | {r['first_step_s']:.2f} | {r['warmup_s']:.2f} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--batch", default=128, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--rounds", default=5, show_default=True, type=int, help="Round-robin rounds.")
@click.option("--steps", default=10, show_default=True, type=int, help="Timed steps per round.")
@click.option(
    "--warmup", default=3, show_default=True, type=int, help="Untimed steps (incl. compile)."
)
@click.option("--w-bits", default=3, show_default=True, type=int)
@click.option("--a-bits", default=2, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--warm-cache",
    is_flag=True,
    help="Use the normal inductor cache (a compile may be a cache hit) instead of a fresh one.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=ROOT / "runs/bench/train_step.json",
    show_default=True,
)
def main(batch, threads, rounds, steps, warmup, w_bits, a_bits, seed, warm_cache, out):
    """Per-step training time of fp32 / ADQ eager / ADQ fused ResNet-20, side by side."""
    cache = None
    if not warm_cache:  # before torch reads it: the compile below starts from nothing
        cache = tempfile.TemporaryDirectory(prefix="adq-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    import torch

    torch.set_num_threads(threads)
    info = machine_info(threads)
    simd = ", ".join(f for f, ok in info["simd"].items() if ok) or "none of AVX2/AVX-512"
    click.echo(
        f"machine: {info['cpu']}; {info['cores']} logical cores; SIMD: {simd}; "
        f"torch threads: {threads}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in info['loadavg_start'])}; torch {info['torch']}"
    )
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (
            torch.randn(batch, 1, 28, 28, generator=gen),
            torch.randint(0, 10, (batch,), generator=gen),
        )
        for _ in range(4)
    ]
    total = len(VARIANTS) * (warmup + rounds * (steps + 1))
    variants = build_variants(w_bits, a_bits, seed, total)
    fns = {n: make_step(*v, batches) for n, v in variants.items()}

    first, warm = {}, {}
    for name, fn in fns.items():  # warm-up: the compile of adq-fused lands in its first step
        t0 = time.perf_counter()
        f, b = fn()
        first[name] = f + b
        for _ in range(max(warmup - 1, 0)):
            fn()
        warm[name] = time.perf_counter() - t0
        click.echo(
            f"  warm-up {name}: first step {first[name]:.2f} s, {warm[name]:.2f} s", err=True
        )

    fwd: dict[str, list[float]] = {n: [] for n in fns}
    rest: dict[str, list[float]] = {n: [] for n in fns}
    medians: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fns[name]()  # one untimed step: the other variant's threads settle
            block = []
            for _ in range(steps):
                f, b = fns[name]()
                fwd[name].append(f)
                rest[name].append(b)
                block.append(f + b)
            medians[name].append(float(np.median(block)) * 1e3)

    rows: dict[str, dict[str, Any]] = {}
    fp32_p50 = float(np.median(np.add(fwd["fp32"], rest["fp32"]))) * 1e3
    for name in fns:
        total_ms = np.add(fwd[name], rest[name]) * 1e3
        p50 = float(np.percentile(total_ms, 50))
        rows[name] = {
            "step_p50_ms": p50,
            "step_p90_ms": float(np.percentile(total_ms, 90)),
            "step_min_ms": float(total_ms.min()),
            "ratio_to_fp32_p50": p50 / fp32_p50,
            "forward_p50_ms": float(np.median(fwd[name])) * 1e3,
            "backward_sgd_p50_ms": float(np.median(rest[name])) * 1e3,
            "round_medians_ms": medians[name],
            "steps_timed": len(total_ms),
            "first_step_s": first[name],
            "warmup_s": warm[name],
            "warmup_steps": warmup,
            "compile_overhead_s": first[name] - p50 / 1e3,
        }
    bits = f"W{w_bits}A{a_bits}, {threads} threads"
    click.echo("")
    click.echo(markdown(rows, batch, bits))
    click.echo("")
    click.echo(
        f"adq-fused first step - its median step = {rows['adq-fused']['compile_overhead_s']:.1f} s "
        f"of torch.compile ({'cold' if cache else 'possibly cached'} inductor cache)"
    )
    info["loadavg_end"] = os.getloadavg()
    report = {
        "machine": info,
        "settings": {
            "model": "resnet20",
            "input": [1, 28, 28],
            "batch": batch,
            "threads": threads,
            "rounds": rounds,
            "steps_per_round": steps,
            "warmup_steps": warmup,
            "w_bits": w_bits,
            "a_bits": a_bits,
            "inductor_cache": "fresh" if cache else "default",
        },
        "results": rows,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"load average at end {', '.join(f'{v:.2f}' for v in os.getloadavg())}; wrote {out}")
    if cache is not None:
        cache.cleanup()


if __name__ == "__main__":
    main()
