"""Two builds of the ai.adq op library (or two exports of a model), side by side in one process.

    python benchmarks/ab_library.py MODEL.onnx LIB_A.so LIB_B.so [--model-b MODEL_B.onnx]
        [--batch 1] [--rounds 150] [--calls 3] [--threads 2] [--spin] [--any-outputs]

One session per library (a library registers the ai.adq domain per session, so both load in one
process; B runs MODEL_B when given, e.g. an export made by another version of the writer);
each round runs `--calls` calls on each session, A then B on even rounds and B then A
on odd ones, so that slow and quiet phases of a shared machine fall on both alike. The outputs
of the two must be bitwise equal (a speed comparison of different numbers says nothing), unless
`--any-outputs`: for models that compute different functions, such as onnxruntime's QDQ model
(MODEL, with either library registered and unused) against ours (MODEL_B). Prints medians and
the ratio B / A.

Thread spinning is off unless `--spin`: a session's idle pool spins for a while after each call
and would take cores from the other session's calls. With it off, every parallel section pays
a thread wake-up, so absolute times are higher than in `latency.py`; the ratio is what this
measures. Inputs are N(0, 1) of the model's input shape with the batch size substituted.
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


def make_session(model: Path, library: Path, threads: int, spin: bool) -> ort.InferenceSession:
    """A CPU session of ``model`` with ``library`` registered."""
    opts = session_options(threads, library=library)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def interleaved_times(
    sessions: list[ort.InferenceSession], feeds: dict, rounds: int, calls: int
) -> list[list[float]]:
    """Seconds per call of each session, the sessions' order reversed every other round."""
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(rounds):
        for k in order if r % 2 == 0 else order[::-1]:
            for _ in range(calls):
                start = time.perf_counter()
                sessions[k].run(None, feeds)
                times[k].append(time.perf_counter() - start)
    return times


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("lib_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("lib_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", default=1, type=click.IntRange(1))
@click.option("--rounds", default=150, type=click.IntRange(1))
@click.option("--calls", default=3, type=click.IntRange(1), help="Calls per session per round.")
@click.option("--threads", default=2, type=click.IntRange(1))
@click.option("--spin/--no-spin", default=False, help="Let idle pool threads spin.")
@click.option(
    "--model-b",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The model B runs (default: MODEL).",
)
@click.option(
    "--any-outputs",
    is_flag=True,
    help="Do not require equal outputs (MODEL_B computes another function, e.g. QDQ's).",
)
def main(
    model: Path,
    lib_a: Path,
    lib_b: Path,
    batch: int,
    rounds: int,
    calls: int,
    threads: int,
    spin: bool,
    model_b: Path | None,
    any_outputs: bool,
) -> None:
    """Median latency of MODEL with op library LIB_A and with LIB_B (running MODEL_B when
    given), and their ratio."""
    runs = [(model, lib_a), (model_b or model, lib_b)]
    sessions = [make_session(m, lib, threads, spin) for m, lib in runs]
    inp = sessions[0].get_inputs()[0]
    shape = [batch, *[d if isinstance(d, int) else 1 for d in inp.shape[1:]]]
    feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    outs = [s.run(None, feeds) for s in sessions]
    for a, b in zip(*outs, strict=True):
        if not any_outputs and not np.array_equal(a, b, equal_nan=True):
            raise click.ClickException("A and B give different outputs")
    times = interleaved_times(sessions, feeds, rounds, calls)
    medians = [float(np.median(t)) * 1e3 for t in times]
    for label, (m, lib), t, med in zip("AB", runs, times, medians, strict=True):
        p25, p75 = (float(np.percentile(t, q)) * 1e3 for q in (25, 75))
        click.echo(
            f"{label} {m.name} + {lib}: median {med:.3f} ms "
            f"(p25 {p25:.3f}, p75 {p75:.3f}, {len(t)} calls)"
        )
    click.echo(f"B / A = {medians[1] / medians[0]:.3f} (batch {batch}, {threads} threads)")


if __name__ == "__main__":
    main()
