"""Peak memory of one onnxruntime session, measured in a fresh process (no torch imported).

python -m runtime.memprobe MODEL.onnx FORMAT BATCH C H W   -> prints MB
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from runtime.library import make_session


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_session_mb(path: str, fmt: str, batch: int, shape: list[int]) -> float:
    """Peak resident memory added by creating the session and running one batch, in MB."""
    x = np.zeros([batch, *shape], np.float32)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    sess = make_session(path, fmt)
    sess.run(None, {sess.get_inputs()[0].name: x})
    return (_status_kb("VmHWM") - base) / 1024


if __name__ == "__main__":
    model, fmt, batch, *dims = sys.argv[1:]
    print(f"{peak_session_mb(model, fmt, int(batch), [int(d) for d in dims]):.2f}")
