"""runtime/schema.py: registering the ai.adq schemas with onnx, and removing them again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.schema import OPS, deregister_onnx_schemas, is_registered, register_onnx_schemas

ROOT = Path(__file__).resolve().parents[1]


def _registered() -> list[str]:
    return [op.name for op in OPS if is_registered(op)]


def test_deregister_removes_every_op_and_register_brings_them_back():
    register_onnx_schemas()
    assert _registered() == [op.name for op in OPS]
    deregister_onnx_schemas()
    assert _registered() == []
    deregister_onnx_schemas()  # a no-op when nothing is registered
    register_onnx_schemas()
    register_onnx_schemas()  # idempotent
    assert _registered() == [op.name for op in OPS]


@pytest.mark.parametrize("use", ["register", "infer"])
def test_a_process_that_registered_the_schemas_exits_cleanly(use):
    # onnx 1.19 hung and 1.20-1.22 crashed at exit when Python inference functions were still
    # registered; the exit status is what a shell script or CI sees.
    body = "from runtime.schema import register_onnx_schemas\nregister_onnx_schemas()\n"
    if use == "infer":  # the inference functions have run, as in every export
        body += (
            "import onnx, onnx.helper as h\n"
            "from runtime.schema import DOMAIN, VERSION\n"
            "n = h.make_node('ThresholdQuant', ['X', 'S', 'T'], ['Q'], domain=DOMAIN)\n"
            "g = h.make_graph([n], 'g', [h.make_tensor_value_info('X', 1, [2, 3])],\n"
            "    [h.make_tensor_value_info('Q', 2, None)],\n"
            "    [h.make_tensor('S', 1, [], [1.0]), h.make_tensor('T', 1, [3], [0.5, 1.5, 2.5])])\n"
            "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17),\n"
            "    h.make_opsetid(DOMAIN, VERSION)])\n"
            "out = onnx.shape_inference.infer_shapes(m, strict_mode=True)\n"
            "print([d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim])\n"
        )
    body += "print('done', flush=True)\n"
    r = subprocess.run(
        [sys.executable, "-c", body], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip().endswith("done")
    if use == "infer":
        assert "[2, 3]" in r.stdout
