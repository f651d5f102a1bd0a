"""The native ai.sslc operators (SparseMatMul, SparseMatMulInt8, SparseMatMulInt4) for onnxruntime.

`make kernels` builds ``build/kernels/libsslc_kernels.so`` from runtimes/kernels/src (see build.sh);
``SSLC_KERNELS_LIBRARY`` points at another build. ``SSLC_KERNEL_ISA=scalar|avx2|avx512`` forces a
kernel path for sessions created afterwards.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import onnxruntime as ort

from sslc_export.errors import UserError

ROOT = Path(__file__).resolve().parents[2]  # the repository, in a checkout (also an editable install)
# A wheel carries neither the C++ sources nor the Makefile: there the library is built in a checkout and named by
# SSLC_KERNELS_LIBRARY.
IN_CHECKOUT = (ROOT / "runtimes" / "kernels" / "build.sh").is_file()
BUILD_FIX = "run `make kernels` (needs g++ and cmake; see runtimes/kernels/build.sh) or set SSLC_KERNELS_LIBRARY"
WHEEL_FIX = ("build it in a checkout of the sslc-export repository (`make kernels`, needs g++ and cmake) and set "
             "SSLC_KERNELS_LIBRARY to its build/kernels/libsslc_kernels.so")


def library_path() -> Path:
    override = os.environ.get("SSLC_KERNELS_LIBRARY")
    return Path(override) if override else ROOT / "build" / "kernels" / "libsslc_kernels.so"


def availability() -> tuple[bool, str]:
    """(True, path) when the library exists, else (False, one line naming the fix)."""
    path = library_path()
    if path.is_file():
        return True, str(path)
    if IN_CHECKOUT:
        return False, f"the ai.sslc kernel library {path} is missing: {BUILD_FIX}"
    if "SSLC_KERNELS_LIBRARY" in os.environ:
        return False, f"the ai.sslc kernel library {path} (SSLC_KERNELS_LIBRARY) is missing: {WHEEL_FIX}"
    return False, f"the ai.sslc kernel library does not come with the installed package: {WHEEL_FIX}"


def require() -> Path:
    """The library's absolute path, or a UserError naming the fix."""
    available, reason = availability()
    if not available:
        raise UserError(reason)
    return library_path().resolve()


def register(options: ort.SessionOptions) -> ort.SessionOptions:
    """Adds the ai.sslc operators to ``options`` (returned for chaining)."""
    options.register_custom_ops_library(str(require()))
    return options


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options that can run sparse exports, e.g.
    ``ORTModelForCausalLM.from_pretrained(folder, session_options=session_options())``."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return register(options)


def isa() -> str:
    """The kernel path a session created now would use: "scalar", "avx2" or "avx512"."""
    library = ctypes.CDLL(str(require()))
    library.sslc_kernels_isa.restype = ctypes.c_char_p
    answer = library.sslc_kernels_isa().decode()
    if answer.startswith("error: "):
        raise UserError(answer.removeprefix("error: "))
    return answer
