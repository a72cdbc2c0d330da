"""Where the time of an ONNX model goes: onnxruntime's profiler, milliseconds per run by op type.

    python benchmarks/op_profile.py MODEL.onnx [MODEL.onnx ...] [--batch 32] [--threads 2]

Each node's time is its median over `--runs` profiled runs (after `--warmup` runs, so the first
run's one-off work such as repacking constant codes is left out), summed by op type. Models in
the adq format (metadata adq.format) get the ai.adq op library. Inputs are random N(0, 1) of the
model's input shape with the batch size substituted. To profile the benchmark's ResNet-18, keep
its files: `python benchmarks/latency.py --models resnet18 --keep DIR ...`.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort

from runtime.library import session_options
from runtime.validate import model_format


def profile(path: Path, batch: int, threads: int, warmup: int, runs: int) -> dict[str, float]:
    """Milliseconds per run by op type (node medians over `runs`, summed)."""
    adq = model_format(onnx.load(str(path), load_external_data=False)) == "adq"
    opts = session_options(threads) if adq else ort.SessionOptions()
    opts.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(warmup + runs):
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["args"]["op_name"], e["name"])].append(e["dur"] / 1e3)
    by_op: dict[str, float] = collections.defaultdict(float)
    for (op, _), times in per_node.items():
        by_op[op] += float(np.median(times[warmup:] or times))
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default=1, type=click.IntRange(1))
@click.option("--threads", default=2, type=click.IntRange(1))
@click.option("--warmup", default=2, type=click.IntRange(0))
@click.option("--runs", default=5, type=click.IntRange(1))
def main(models: tuple[str, ...], batch: int, threads: int, warmup: int, runs: int) -> None:
    """Milliseconds per run by op type of each MODEL (onnxruntime's profiler)."""
    for m in models:
        by_op = profile(Path(m), batch, threads, warmup, runs)
        total = sum(by_op.values())
        click.echo(f"{m} (batch {batch}, {threads} threads): {total:.2f} ms in kernels")
        for op, ms in by_op.items():
            click.echo(f"  {op:20s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
