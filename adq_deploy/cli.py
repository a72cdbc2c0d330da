"""Command-line tools: adq-train and adq-eval (click). Bad input exits 2 with one `error:` line."""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from .checkpoint import CheckpointError
from .data import DATASETS, DataError

# RuntimeError: a missing op library (runtime.library.OpLibraryError) is the user's to fix, not
# a traceback. onnxruntime's own exceptions derive from Exception alone: runtime.library's
# make_session turns a session that cannot load the model into a ValueError.
USER_ERRORS = (CheckpointError, DataError, ValueError, OSError, RuntimeError)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures (bad files, bad values) into one `error:` line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except USER_ERRORS as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise click.exceptions.Exit(_fail(msg)) from None

    return wrapper


def _fail(msg: str) -> int:
    click.echo(f"error: {msg}", err=True)
    return 2


def _json_dict(value: str) -> dict[str, Any]:
    try:
        out = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if not isinstance(out, dict):
        raise click.BadParameter("expected a JSON object")
    return out


def _int_list(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out:
        raise click.BadParameter("expected at least one integer")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option(
    "-o",
    "--out",
    default="checkpoint.pt",
    help="Checkpoint to write (v1 format). "
    "The fp32 teacher goes beside it as OUT_STEM.fp32.pt, resume state as .resume.pt.",
)
@click.option("--model", default="resnet20", help="Registry name of the network.")
@click.option(
    "--model-kwargs",
    default="{}",
    callback=lambda c, p, v: _json_dict(v),
    help="JSON keyword arguments of the model factory, e.g. '{\"width\": 8}'.",
)
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="fashion-mnist")
@click.option(
    "--data-dir",
    default=None,
    help="Folder with the standard IDX files "
    "(default for fashion-mnist: the Debian package's folder).",
)
@click.option(
    "--teacher",
    default=None,
    help="fp32 checkpoint to distill from instead of training one (skips the fp32 stage).",
)
@click.option("--fp32-epochs", default=10, type=click.IntRange(0))
@click.option("--qat-epochs", default=10, type=click.IntRange(0))
@click.option("--batch-size", default=128, type=click.IntRange(1))
@click.option(
    "--lr", default=0.1, type=float, help="Peak learning rate of the fp32 stage (cosine)."
)
@click.option("--qat-lr", default=0.01, type=float, help="Peak learning rate of QAT (cosine).")
@click.option(
    "--avg-bits",
    default=2.81,
    type=float,
    help="Average weight bits over the low-bit "
    "layers, parameter-weighted (first conv and classifier excluded).",
)
@click.option(
    "--w-bits-choices",
    default="2,3,4",
    callback=lambda c, p, v: _int_list(v),
    help="Candidate weight bits for the allocation.",
)
@click.option(
    "--w-bits",
    default=3,
    type=click.IntRange(2, 8),
    help="Weight bits of every low-bit layer with --allocation fixed.",
)
@click.option("--a-bits", default=2, type=click.IntRange(1, 8), help="Activation bits.")
@click.option(
    "--act",
    type=click.Choice(["n2uq", "lsq"]),
    default="n2uq",
    help="Activation quantizer (lsq: the uniform ablation).",
)
@click.option(
    "--w-init",
    type=click.Choice(["quantile", "uniform", "kmeans"]),
    default="quantile",
    help="Codebook initialization.",
)
@click.option(
    "--w-form",
    type=click.Choice(["full", "symmetric"]),
    default="full",
    help="Codebook of 2^b levels (full) or 2^b-1 levels symmetric about zero.",
)
@click.option("--ema/--no-ema", default=True, help="EMA adaptation of the codebooks during QAT.")
@click.option("--ema-beta", default=0.99, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--edge-bits",
    type=click.Choice(["8"]),
    default=None,
    help="Quantize the first and last layer at W8A8 (default: keep them in float).",
)
@click.option(
    "--input-bits",
    type=click.Choice(["8"]),
    default=None,
    help="With --edge-bits 8: also quantize the network input onto 8-bit levels with a zero "
    "point, so that the first layer runs in integers (the adq --int-codebooks export fuses it "
    "into one LutConvPoolQuant).",
)
@click.option(
    "--allocation",
    type=click.Choice(["sensitivity", "no-hessian", "fixed"]),
    default="sensitivity",
    help="sensitivity: Hessian trace x perturbation (HAWQ-V2 "
    "style); no-hessian: perturbation only (ablation); fixed: --w-bits everywhere.",
)
@click.option("--sensitivity-batches", default=4, type=click.IntRange(1))
@click.option("--kd-weight", default=1.0, type=float, help="Weight of the distillation loss.")
@click.option("--label-weight", default=1.0, type=float, help="Weight of the label loss.")
@click.option("--kd-temperature", default=4.0, type=float)
@click.option("--augment/--no-augment", default=True, help="Random crop (pad 2) and flip.")
@click.option(
    "--train-limit",
    default=None,
    type=click.IntRange(1),
    help="Use only this many training images (quick runs).",
)
@click.option("--test-limit", default=None, type=click.IntRange(1))
@click.option("--seed", default=0, type=int)
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--resume", is_flag=True, help="Continue from OUT's .resume.pt / .fp32.pt.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option(
    "--compile/--no-compile",
    default=True,
    help="torch.compile the N2UQ backward "
    "kernel (about 1.3x faster QAT steps on CPU; a few seconds to compile).",
)
@user_errors
def train_main(**kw: Any) -> None:
    """Train an ADQ model: fp32 teacher, sensitivity analysis, bit allocation under --avg-bits,
    quantization-aware training with distillation, then a v1 checkpoint with its metrics.

    Runs on CUDA when present; launch with torchrun for data-parallel training.
    """
    from .train import TrainArgs, run

    for key in ("edge_bits", "input_bits"):
        kw[key] = None if kw[key] is None else int(kw[key])
    if kw["input_bits"] is not None and kw["edge_bits"] is None:
        raise ValueError("--input-bits 8 quantizes the first layer's input: add --edge-bits 8")
    args = TrainArgs(**kw)
    argv = sys.argv[1:]
    if argv[:1] == ["train"]:  # invoked as `adq train ...` or `python -m adq_deploy.cli train`
        argv = argv[1:]
    run(args, command=shlex.join(["adq-train", *argv]))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-dir", default=None, help="Folder with the standard IDX files.")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="fashion-mnist")
@click.option("--limit", default=None, type=click.IntRange(1), help="Evaluate the first N images.")
@click.option(
    "--allow-import",
    is_flag=True,
    help="Trust a 'module:factory' architecture named in the checkpoint and import it.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@user_errors
def eval_main(
    checkpoint: str,
    data_dir: str | None,
    dataset: str,
    limit: int | None,
    allow_import: bool,
    as_json: bool,
) -> None:
    """Evaluate CHECKPOINT on the test split and print its layers, bits and top-1 accuracy."""
    import torch

    from .checkpoint import load_checkpoint
    from .data import make_loaders
    from .quant import average_bits, summary
    from .train import evaluate

    ckpt = load_checkpoint(checkpoint, allow_import=allow_import)
    _, test_loader, _ = make_loaders(dataset, data_dir, 256, test_limit=limit, augment=False)
    top1 = evaluate(ckpt.model, test_loader, torch.device("cpu"))
    result: dict[str, Any] = {
        "checkpoint": checkpoint,
        "top1": top1,
        "samples": len(test_loader.dataset),
    }
    if ckpt.quant_config is not None:
        avg = average_bits(ckpt.model)
        result.update(
            avg_bits_param_weighted=avg.param_weighted, avg_bits_layer_mean=avg.layer_mean
        )
    for key in ("fp32_top1", "adq_top1"):
        if key in ckpt.metrics:
            result[f"recorded_{key}"] = ckpt.metrics[key]
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if ckpt.quant_config is not None:
        click.echo(summary(ckpt.model))
    click.echo(
        f"{checkpoint}: top-1 {top1:.2f}% on {result['samples']} {dataset} test images "
        "(evaluated now, not read from the metadata)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    default=None,
    help="ONNX file to write [default: CHECKPOINT with the suffix .FORMAT.onnx].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["adq", "standard", "int8"]),
    default="adq",
    help="adq: ai.adq custom ops, bit-packed codes (needs the op library); standard: "
    "stock ONNX (UINT2/UINT4 codes, Cast+Gather); int8: integer conv on uint8 levels.",
)
@click.option(
    "--opset",
    default=None,
    type=click.IntRange(13),
    help="Default-domain opset of "
    "the standard format (25: UINT2 codes; 21-24: UINT4; 13-20: UINT8).",
)
@click.option(
    "--no-simplify", is_flag=True, help="Skip onnxsim (codes are never folded either way)."
)
@click.option(
    "--int-codebooks",
    is_flag=True,
    help="adq format: snap each codebook to integers (as the int8 format does; the scale goes "
    "into the layer's Scale), so that the op library runs exact int8 convolutions (AVX-512 "
    "VNNI). Same file size; the snapping is the only change in the numbers.",
)
@click.option(
    "--nchw",
    is_flag=True,
    help="With --int-codebooks: keep the activations NCHW and the shortcuts as their own nodes "
    "(for CPUs without AVX-512 VNNI, where the channels-last graph runs through copies).",
)
@click.option(
    "--allow-import",
    is_flag=True,
    help="Trust a 'module:factory' architecture named in the checkpoint and import it.",
)
@user_errors
def export_main(
    checkpoint: str,
    out: str | None,
    fmt: str,
    opset: int | None,
    no_simplify: bool,
    int_codebooks: bool,
    nchw: bool,
    allow_import: bool,
) -> None:
    """Fold CHECKPOINT into lookup-table weights and integer activations and write ONNX."""
    from exporters.export import export

    result = export(
        checkpoint,
        out,
        fmt=fmt,
        opset=opset,
        simplify_graph=not no_simplify,
        allow_import=allow_import,
        int_codebooks=int_codebooks,
        nchw=nchw,
    )
    click.echo(result.summary())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="The checkpoint the model was exported from.",
)
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default="fashion-mnist")
@click.option("--data-dir", default=None, help="Folder with the standard IDX files.")
@click.option(
    "--samples",
    default=None,
    type=click.IntRange(1),
    help="Test images to compare [default: the whole test split].",
)
@click.option(
    "--batch-sizes",
    default="1,32",
    callback=lambda c, p, v: _int_list(v),
    help="Batch sizes to time.",
)
@click.option("--latency-runs", default=30, type=click.IntRange(1))
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(1),
    help="Intra-op threads of both runtimes [default: theirs].",
)
@click.option("--report", "report_path", default=None, help="Write the JSON report here.")
@click.option("--min-agreement", default=99.9, type=float, help="Top-1 agreement gate, %.")
@click.option(
    "--max-logit-error", default=1e-4, type=float, help="Gate on mean |logit error| / mean |logit|."
)
@click.option(
    "--max-accuracy-drop", default=0.5, type=float, help="Gate on PyTorch minus ONNX top-1, points."
)
@click.option("--allow-import", is_flag=True, help="Trust a 'module:factory' architecture.")
@click.option("--progress/--no-progress", default=True)
@user_errors
def validate_main(
    model: str,
    checkpoint: str,
    dataset: str,
    data_dir: str | None,
    samples: int | None,
    batch_sizes: tuple[int, ...],
    latency_runs: int,
    threads: int | None,
    report_path: str | None,
    min_agreement: float,
    max_logit_error: float,
    max_accuracy_drop: float,
    allow_import: bool,
    progress: bool,
) -> None:
    """Compare MODEL (an adq, standard or int8 export) with the PyTorch model of CHECKPOINT on
    real test images: accuracy, top-1 agreement, logit error, latency, size and session memory.

    Exit status: 0 when every parity gate passes, 1 when one fails, 2 on bad input.
    """
    from runtime.validate import Thresholds, format_report, validate, write_report

    report = validate(
        model,
        checkpoint,
        dataset=dataset,
        data_dir=data_dir,
        samples=samples,
        batch_sizes=batch_sizes,
        latency_runs=latency_runs,
        threads=threads,
        progress=progress,
        thresholds=Thresholds(min_agreement, max_logit_error, max_accuracy_drop),
        allow_import=allow_import,
    )
    click.echo(format_report(report))
    if report_path:
        write_report(report, report_path)
    if not report.passed:
        raise click.exceptions.Exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """adq-deploy: train, evaluate and export ADQ mixed-precision models."""


cli.add_command(train_main, "train")
cli.add_command(eval_main, "eval")
cli.add_command(export_main, "export")
cli.add_command(validate_main, "validate")

if __name__ == "__main__":
    cli()
