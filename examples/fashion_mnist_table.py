"""Reproduce the README's Fashion-MNIST results: one fp32 teacher, the shipped ADQ checkpoint,
and the ablation rows, each trained by adq-train and evaluated again from its checkpoint.

    python examples/fashion_mnist_table.py [--out runs/fmnist] [--fp32-epochs 12]
        [--qat-epochs 12] [--ablation-epochs 1] [--device auto]

Rows whose checkpoint exists are not retrained (delete them to start over). Logs go to
OUT/<row>.log; the table is printed as Markdown and written to OUT/results.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

# Each ablation row changes one thing of the ADQ recipe (method.md, "Ablation switches").
ROWS = {
    "adq": [],
    "uniform-w2": ["--allocation", "fixed", "--w-bits", "2"],
    "uniform-w3": ["--allocation", "fixed", "--w-bits", "3"],
    "no-quantile-init": ["--w-init", "uniform"],
    "no-ema": ["--no-ema"],
    "no-hessian-allocation": ["--allocation", "no-hessian"],
    "lsq-activations": ["--act", "lsq"],
}


def _train(out: Path, extra: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "adq_deploy.cli", "train", "-o", str(out), "--no-progress", *extra]
    click.echo(f"$ {' '.join(cmd[2:])}  (log: {log})", err=True)
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)


def _evaluate(ckpt: Path) -> dict:
    cmd = [sys.executable, "-m", "adq_deploy.cli", "eval", str(ckpt), "--json"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


@click.command()
@click.option("--out", default="runs/fmnist", type=click.Path(file_okay=False))
@click.option("--model", default="resnet20")
@click.option("--fp32-epochs", default=12, type=int)
@click.option("--qat-epochs", default=12, type=int, help="QAT epochs of the shipped checkpoint.")
@click.option("--ablation-epochs", default=1, type=int, help="QAT epochs of every table row.")
@click.option("--a-bits", default=2, type=int)
@click.option("--seed", default=0, type=int)
@click.option("--device", default="auto")
@click.option("--rows", default=",".join(ROWS), help="Comma-separated subset of the rows.")
def main(out, model, fp32_epochs, qat_epochs, ablation_epochs, a_bits, seed, device, rows):
    """Train and evaluate every row of the Fashion-MNIST table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--model", model, "--a-bits", str(a_bits), "--seed", str(seed), "--device", device]
    shipped = out / "adq-shipped.pt"
    teacher = out / "adq-shipped.fp32.pt"
    if not shipped.exists():
        _train(
            shipped,
            [*common, "--fp32-epochs", str(fp32_epochs), "--qat-epochs", str(qat_epochs)],
            out / "adq-shipped.log",
        )
    results = {"fp32": _evaluate(teacher), "adq-shipped": _evaluate(shipped)}
    for name in rows.split(","):
        ckpt = out / f"{name}.pt"
        if not ckpt.exists():
            _train(
                ckpt,
                [
                    *common,
                    "--teacher",
                    str(teacher),
                    "--qat-epochs",
                    str(ablation_epochs),
                    *ROWS[name],
                ],
                out / f"{name}.log",
            )
        results[name] = _evaluate(ckpt)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    click.echo("| row | top-1 (%) | avg bits, param-weighted | avg bits, layer mean |")
    click.echo("| --- | --- | --- | --- |")
    for name, r in results.items():
        pw = r.get("avg_bits_param_weighted")
        lm = r.get("avg_bits_layer_mean")
        fmt = lambda v: "32 (fp32)" if v is None else f"{v:.3f}"  # noqa: E731
        click.echo(f"| {name} | {r['top1']:.2f} | {fmt(pw)} | {fmt(lm)} |")


if __name__ == "__main__":
    main()
