"""What machine a benchmark ran on: CPU model, SIMD flags, cores, threads, versions, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

SIMD_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
)


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, the SIMD flags that matter here, core count, versions and load."""
    import onnxruntime as ort
    import torch

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or "unknown",
        "simd": {f: f in flags for f in SIMD_FLAGS},
        "cores": os.cpu_count(),
        "threads": threads,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line for the top of a benchmark's output."""
    simd = ", ".join(f for f, ok in info["simd"].items() if ok) or "none of AVX2/AVX-512"
    return (
        f"machine: {info['cpu']}; {info['cores']} logical cores; SIMD: {simd}; "
        f"threads used: {info['threads']} (torch and onnxruntime intra-op); "
        f"load average at start {', '.join(f'{v:.2f}' for v in info['loadavg_start'])}; "
        f"torch {info['torch']}, onnxruntime {info['onnxruntime']}"
    )
