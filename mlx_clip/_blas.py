"""Load a fast BLAS into the process before `mlx.core` so MLX's CPU matmuls use it.

The Linux `mlx-cpu` wheel links the netlib *reference* BLAS (fp32 matmul ~4 GFLOP/s on 2 cores).
MLX calls plain `cblas_sgemm`; a library loaded earlier with RTLD_GLOBAL that exports that symbol
wins symbol resolution, so preloading MKL's single dynamic library (pip package `mkl`) gives
~40x faster matmuls with no rebuild. This must run before the first `import mlx.core`.

Override with MLXCLIP_BLAS=/path/to/libblas.so (any library exporting cblas_sgemm), or
MLXCLIP_BLAS=none to keep the wheel's own BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys

from mlx_clip import _libs, onednn_blas

# What was loaded (path) or why nothing was (a sentence); read by `mlxclip doctor`.
LOADED: str | None = None
REASON: str = "not attempted"


def load() -> str | None:
    """Preload a fast BLAS once; return its path (or None, with REASON saying why)."""
    global LOADED, REASON
    if LOADED is not None or REASON != "not attempted":
        return LOADED
    choice = os.environ.get("MLXCLIP_BLAS", "").strip()
    if choice.lower() == "none":
        REASON = "disabled by MLXCLIP_BLAS=none"
        return None
    if not sys.platform.startswith("linux"):
        REASON = "not Linux: MLX uses Accelerate (macOS) or its own GPU kernels"
        return None
    if "mlx.core" in sys.modules:
        REASON = "mlx.core was imported before mlx_clip, too late to preload a BLAS"
        return None
    paths = [choice] if choice else _libs.in_prefixes("libmkl_rt.so*")
    errors = []
    for path in paths:
        if "mkl" in os.path.basename(path):  # MLX's sgemm by oneDNN where installed, MKL the rest (onednn_blas.py)
            onednn_blas.load(path)
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:  # keep trying the others, report all if none loads
            errors.append(f"{path}: {exc}")
            continue
        LOADED = path
        REASON = "loaded"
        return path
    REASON = "; ".join(errors) or "no fast BLAS found (pip install mkl, or set MLXCLIP_BLAS)"
    return None


def _mkl():
    """The loaded library when it is MKL (its thread controls), else None."""
    return ctypes.CDLL(LOADED) if LOADED and "mkl" in os.path.basename(LOADED) else None


def set_threads(n: int) -> bool:
    """MKL's thread count for GEMMs issued from now on (all threads without their own setting); False when the
    loaded BLAS is not MKL."""
    mkl = _mkl()
    if mkl is not None:
        mkl.MKL_Set_Num_Threads(ctypes.c_int(n))
    return mkl is not None


def get_threads() -> int | None:
    """MKL's current thread count for GEMMs; None when the loaded BLAS is not MKL."""
    mkl = _mkl()
    return None if mkl is None else int(mkl.MKL_Get_Max_Threads())


def describe() -> str:
    """The BLAS MLX's CPU matmuls use, in words (`mlxclip doctor`, the bench report)."""
    if LOADED is None:
        return f"bundled ({REASON})"
    return f"{LOADED}; sgemm by oneDNN: {onednn_blas.STATUS}" if onednn_blas.STATUS.startswith("on") else LOADED
