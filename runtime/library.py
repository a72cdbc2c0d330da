"""Locate, build and register the ai.adq onnxruntime custom-op library (``runtime/cpp``).

``session_options()`` is what a caller needs to run an ``adq``-format model::

    import onnxruntime as ort
    from runtime.library import session_options
    sess = ort.InferenceSession("model.onnx", session_options(), providers=["CPUExecutionProvider"])

The library is ``build/ops/libadq_ops.so`` (``$ADQ_BUILD_DIR/ops`` when that is set), built by
``scripts/build-ops.sh``; the environment variable ``ADQ_OPS_LIBRARY`` names another file.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from pathlib import Path

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

ENV_LIBRARY = "ADQ_OPS_LIBRARY"
REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO_ROOT / "runtime" / "cpp"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-ops.sh"
LIBRARY_NAME = "libadq_ops.so"
BUILD_HINT = "build it with `bash scripts/build-ops.sh` (or runtime.library.build_library())"


class OpLibraryError(RuntimeError):
    """The ai.adq op library is missing or could not be built."""


def default_library_path() -> Path:
    """Where ``scripts/build-ops.sh`` writes the library."""
    build = Path(os.environ.get("ADQ_BUILD_DIR") or REPO_ROOT / "build")
    return build / "ops" / LIBRARY_NAME


def get_library_path() -> Path:
    """The op library to load: ``$ADQ_OPS_LIBRARY`` or the built one. Raises if missing."""
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override)
        if not path.is_file():
            raise OpLibraryError(
                f"{ENV_LIBRARY}={override} is not a file; unset it or {BUILD_HINT}"
            )
        return path
    path = default_library_path()
    if not path.is_file():
        raise OpLibraryError(f"ai.adq op library not built ({path} is missing); {BUILD_HINT}")
    return path


def _sources() -> list[Path]:
    return [
        p for p in SOURCE_DIR.iterdir() if p.suffix in {".cc", ".h"} or p.name == "CMakeLists.txt"
    ]


def _is_stale(lib: Path) -> bool:
    built = lib.stat().st_mtime
    return any(p.stat().st_mtime > built for p in _sources())


def build_library(force: bool = False) -> Path:
    """Build the library with ``scripts/build-ops.sh`` unless it is present and up to date.

    Returns its path. With ``$ADQ_OPS_LIBRARY`` set, returns that file and builds nothing.
    Raises OpLibraryError (with the build's output) when the build fails.
    """
    if os.environ.get(ENV_LIBRARY):
        return get_library_path()
    lib = default_library_path()
    if not force and lib.is_file() and not (SOURCE_DIR.is_dir() and _is_stale(lib)):
        return lib
    if not BUILD_SCRIPT.is_file():
        raise OpLibraryError(
            f"cannot build the ai.adq op library: {BUILD_SCRIPT} not found (not a source "
            f"checkout); set {ENV_LIBRARY} to a built {LIBRARY_NAME}"
        )
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not lib.is_file():
        log = (proc.stdout + proc.stderr).strip().splitlines()
        tail = "\n".join(log[-40:])
        raise OpLibraryError(
            f"building the ai.adq op library failed (exit {proc.returncode}) with "
            f"{BUILD_SCRIPT}:\n{tail}"
        )
    return lib


def op_names(path: str | os.PathLike | None = None) -> list[str]:
    """The op names the C++ library registers (its ``AdqOpNames()``), in table order."""
    lib = ctypes.CDLL(str(path or get_library_path()))
    lib.AdqOpNames.restype = ctypes.c_char_p
    return lib.AdqOpNames().decode().split(",")


def session_options(
    num_threads: int | None = None, library: str | os.PathLike | None = None
) -> ort.SessionOptions:
    """SessionOptions with the ai.adq ops registered (from ``library``, default the built one).

    Also sets ``session.qdq_matmulnbits_accuracy_level=0`` (onnxruntime otherwise fuses
    DequantizeLinear+MatMul into MatMulNBits with int8 activations, breaking exact parity).
    ``num_threads`` sets the intra-op thread count (the ops parallelize on that pool).
    """
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library or get_library_path()))
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if num_threads is not None:
        so.intra_op_num_threads = int(num_threads)
    return so


# onnxruntime's own exception classes (Fail, InvalidArgument, ...; none is a RuntimeError).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception)
)

INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger"})


def oldest_onnxruntime(model: onnx.ModelProto) -> tuple[int, int]:
    """The oldest onnxruntime (major, minor) that runs this export, as measured in
    docs/export.md: int8 (ConvInteger u8 x s8) and opset 25 1.24, opset 21 1.23, the op
    library 1.21, older opsets 1.18."""
    if any(n.op_type in INTEGER_OPS for n in model.graph.node):
        return (1, 24)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset >= 25:
        return (1, 24)
    if opset >= 21:
        return (1, 23)
    if any(o.domain == "ai.adq" for o in model.opset_import):
        return (1, 21)
    return (1, 18)


def installed_onnxruntime() -> tuple[int, int]:
    """The installed onnxruntime's (major, minor)."""
    major, minor = (int(p) for p in ort.__version__.split(".")[:2])
    return major, minor


def ort_message(error: BaseException) -> str:
    """The reason in an onnxruntime error, on one line: its last line without the
    "[ONNXRuntimeError] : 1 : FAIL : " prefix and the C++ source location and function
    signature that precede the text."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", lines[-1] if lines else repr(error))
    where = re.search(r"\S+\.(?:cc|cpp|h):\d+ ", text)
    if where is None:
        return text
    # Skip the signature after the location: up to the parenthesis that closes its first one.
    depth, i = 0, text.find("(", where.end())
    while 0 <= i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
        if depth == 0:
            return (text[: where.start()] + text[i:].strip()).strip() or text
    return text


def make_session(
    path: str | os.PathLike, fmt: str, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU session for an export; the ai.adq op library is registered for the adq format.

    onnxruntime's own load errors (several classes, none a RuntimeError, messages of many
    lines) become one ValueError line that says when the export needs a newer onnxruntime.
    """
    if fmt == "adq":
        opts = session_options(threads)
    else:
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as e:
        msg = f"onnxruntime {ort.__version__} cannot load {path}: {ort_message(e)}"
        try:
            need = oldest_onnxruntime(onnx.load(str(path), load_external_data=False))
        except Exception:  # noqa: BLE001 - the load error above is the one to report
            need = (0, 0)
        if installed_onnxruntime() < need:
            msg += f"; this export needs onnxruntime >= {need[0]}.{need[1]} (docs/export.md)"
        raise ValueError(msg) from None


__all__ = [
    "make_session",
    "ORT_ERRORS",
    "ort_message",
    "oldest_onnxruntime",
    "installed_onnxruntime",
    "ENV_LIBRARY",
    "OpLibraryError",
    "build_library",
    "default_library_path",
    "get_library_path",
    "op_names",
    "session_options",
]
