"""Where the time of an ONNX model goes: onnxruntime's profiler, milliseconds per run by op type
(with ``--nodes``, by node too, in execution order with each node's output shapes).

    python benchmarks/op_profile.py MODEL.onnx [MODEL.onnx ...] [--batch 32] [--threads 2] [--nodes]

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


def profile_nodes(
    path: Path, batch: int, threads: int, warmup: int, runs: int
) -> list[tuple[str, str, float, str]]:
    """(node, op type, median ms over ``runs``, output shapes) per node, in execution order."""
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
    shapes: dict[tuple[str, str], str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = (e["name"][: -len("_kernel_time")], e["args"]["op_name"])
            per_node[key].append(e["dur"] / 1e3)
            outs = e["args"].get("output_type_shape", [])
            shapes[key] = " ".join(str(next(iter(o.values()))) for o in outs)
    return [
        (name, op, float(np.median(t[warmup:] or t)), shapes[(name, op)])
        for (name, op), t in per_node.items()
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default=1, type=click.IntRange(1))
@click.option("--threads", default=2, type=click.IntRange(1))
@click.option("--warmup", default=2, type=click.IntRange(0))
@click.option("--runs", default=5, type=click.IntRange(1))
@click.option("--nodes", is_flag=True, help="Also list every node's time and output shapes.")
def main(
    models: tuple[str, ...], batch: int, threads: int, warmup: int, runs: int, nodes: bool
) -> None:
    """Milliseconds per run by op type of each MODEL (onnxruntime's profiler)."""
    for m in models:
        per_node = profile_nodes(Path(m), batch, threads, warmup, runs)
        by_op: dict[str, float] = collections.defaultdict(float)
        for _, op, ms, _ in per_node:
            by_op[op] += ms
        total = sum(by_op.values())
        click.echo(f"{m} (batch {batch}, {threads} threads): {total:.2f} ms in kernels")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {op:20s} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
        if nodes:
            for name, op, ms, shapes in per_node:
                click.echo(f"    {ms:8.3f} ms  {op:18s} {name[:44]:44s} -> {shapes}")


if __name__ == "__main__":
    main()
