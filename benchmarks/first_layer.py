"""Single-node timings of the first layer's ops on ResNet-18's input (3 x 224 x 224).

    python benchmarks/first_layer.py [--batch-sizes 32,1] [--runs 10] [--rounds 3] [--threads 2]
        [--library PATH] [--ops ThresholdQuant,LutConvPoolQuant,ConvPoolQuant]

- ``ThresholdQuant`` on the float input with 255 evenly spaced thresholds (an 8-bit input
  quantizer, zero point 128);
- ``LutConvPoolQuant`` (uint8 input, integer codebook levels in -64..64, 8-bit codes) against
  ``ConvPoolQuant`` (float input and weights) on the stem: 64 channels, 7 x 7 stride 2 pad 3,
  ReLU, 3 x 3 stride 2 pad 1 max pooling, 3 thresholds.

Each op runs in its own session, ``--rounds`` blocks of ``--runs`` calls (after 3 warm-up calls),
one op after the other (two sessions' spinning thread pools would take cores from each other's
calls); prints the median and the minimum of all calls. Random weights and inputs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from runtime.library import session_options  # noqa: E402
from runtime.packing import pack_rows  # noqa: E402
from runtime.reference.graphs import single_op_model  # noqa: E402

STEM = dict(
    kernel_shape=[7, 7],
    strides=[2, 2],
    pads=[3, 3, 3, 3],
    relu=1,
    pool_kernel_shape=[3, 3],
    pool_strides=[2, 2],
    pool_pads=[1, 1, 1, 1],
)


def cases(n: int, rng: np.random.Generator):
    """(name, op, inputs, attrs, constants, feeds) of each timed node at batch n."""
    m, c, k = 64, 3, 7
    codebook = np.arange(-64, 65, dtype=np.float32)
    idx = rng.integers(0, len(codebook), size=(m, c * k * k))
    scale = rng.uniform(0.001, 0.01, m).astype(np.float32)
    bias = rng.normal(size=m).astype(np.float32)
    quant = {"QScale": np.ones(1, np.float32), "QThresholds": np.array([0.5, 1.5, 2.5], np.float32)}
    xu = rng.integers(0, 256, size=(n, c, 224, 224), dtype=np.uint8)
    xf = ((xu.astype(np.float32) - 128) * np.float32(0.02)).astype(np.float32)
    w = (codebook[idx].reshape(m, c, k, k) * scale[:, None, None, None]).astype(np.float32)
    thresholds = (np.arange(1, 256) - 128.5).astype(np.float32)
    lut = {"X": xu, "Codes": pack_rows(idx, 8), "Codebook": codebook, "Scale": scale}
    lut.update(Bias=bias, **quant)
    return [
        (
            "ThresholdQuant, 255 thresholds",
            "ThresholdQuant",
            {"X": xf, "Scale": np.array([50.0], np.float32), "Thresholds": thresholds},
            {},
        ),
        ("LutConvPoolQuant", "LutConvPoolQuant", lut, dict(bits=8, x_zero_point=128, **STEM)),
        ("ConvPoolQuant", "ConvPoolQuant", {"X": xf, "W": w, "B": bias, **quant}, STEM),
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--batch-sizes", default="32,1")
@click.option("--runs", default=10, type=int)
@click.option("--rounds", default=3, type=int)
@click.option("--threads", default=2, type=int)
@click.option("--library", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--ops", default="ThresholdQuant,LutConvPoolQuant,ConvPoolQuant", help="to time")
def main(
    batch_sizes: str, runs: int, rounds: int, threads: int, library: str | None, ops: str
) -> None:
    rng = np.random.default_rng(0)
    for n in (int(b) for b in batch_sizes.split(",")):
        for name, op, inputs, attrs in cases(n, rng):
            if op not in ops.split(","):
                continue
            constants = tuple(k for k in inputs if k != "X")
            model = single_op_model(op, inputs, attrs, constants=constants)
            opts = session_options(threads, library=library)
            sess = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
            feeds = {"X": inputs["X"]}
            times = []
            for _ in range(rounds):
                for _ in range(3):
                    sess.run(None, feeds)
                for _ in range(runs):
                    start = time.perf_counter()
                    sess.run(None, feeds)
                    times.append(time.perf_counter() - start)
                time.sleep(0.2)
            median, best = np.median(times) * 1e3, np.min(times) * 1e3
            print(f"batch {n:3d}  {name:32s} median {median:8.3f} ms  min {best:8.3f} ms")
            del sess


if __name__ == "__main__":
    main()
