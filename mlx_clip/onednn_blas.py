"""MLX's CPU matmuls through oneDNN's matmul primitive (Linux x86-64, with MKL; on by default with AVX-512).

MLX's CPU matmul is one `cblas_sgemm` call per product. On this project's 2-core AVX-512 VM oneDNN's brgemm matmul runs
the models' products at ~195-210 GFLOP/s on two threads where MKL runs 145-195, and 90-105 on one thread where MKL runs
76-94 (single-thread GEMMs are what batch-parallel mode issues, cpu_streams.py). `onednn_sgemm.c` is a `cblas_sgemm`
that runs each call as a oneDNN matmul, made once per shape and cached; it is built here with the system's C compiler
(once, cached by source hash) and loaded ahead of MKL, so MLX's sgemm resolves to it while every other BLAS call, and
any sgemm it does not take, goes to MKL. oneDNN's library comes from pip's `onednn-cpu-gomp` (GNU OpenMP build, ~40 MB,
a Linux x86-64 dependency). Measured gains, alternating processes (benchmarks/perf-notes.md, change 34): the ViT-B/32
b16 train step -16%, its image embedding -16% (b1) and -19% (b16), the image + text pair -25%.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from mlx_clip import _libs
from mlx_clip.cpu_jit import cpu_has
from mlx_clip.switches import env_switch

SOURCE = Path(__file__).with_name("onednn_sgemm.c")
STATUS = "not attempted"  # what happened, for `mlxclip doctor` and the bench report
_LIB: ctypes.CDLL | None = None


# Products with M*N*K below this go to MKL (MLXCLIP_ONEDNN_MIN_MNK overrides): an attention head's few-token products
# (65 x 64 x 65 in `small`) cost oneDNN more in per-call work than they gain; `small`'s b32 step, alternating processes:
# all to oneDNN 361.9 / 341.6 ms, these to MKL 323.6 / 325.6, MKL alone 354.3 / 329.5
MIN_MNK = 1 << 20


def min_mnk() -> float:
    value = os.environ.get("MLXCLIP_ONEDNN_MIN_MNK", "").strip()
    try:
        return float(value) if value else float(MIN_MNK)
    except ValueError:
        warnings.warn(f"MLXCLIP_ONEDNN_MIN_MNK={value!r}: expected a number; using {MIN_MNK}", stacklevel=2)
        return float(MIN_MNK)


def enabled() -> bool:
    """MLXCLIP_ONEDNN=1 / 0; unset, on where the gains were measured: a CPU with AVX-512 (oneDNN's brgemm kernels there;
    on AVX2-only CPUs MKL's own kernels have not been compared). It still needs oneDNN, a C compiler and MKL: STATUS
    says what was missing."""
    return env_switch("MLXCLIP_ONEDNN", cpu_has("avx512f"))


def find_dnnl() -> str | None:
    """oneDNN's shared library as pip's onednn-cpu-gomp installs it (PREFIX/lib), or None."""
    return next(iter(_libs.in_prefixes("libdnnl.so.3*")), None)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx_clip"


def build(dnnl: str, compiler: str) -> Path:
    """The shim for this source, oneDNN library and compiler, compiled once (atomically: a process that loses the race
    finds the other's file complete)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + dnnl.encode() + compiler.encode()).hexdigest()[:16]
    out = _cache_dir() / f"onednn_sgemm-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    libdir = os.path.dirname(os.path.realpath(dnnl))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = os.path.join(tmp, out.name)
        cmd = [compiler, "-O2", "-shared", "-fPIC", "-fopenmp", str(SOURCE), "-o", built, f"-L{libdir}",
               f"-l:{os.path.basename(os.path.realpath(dnnl))}", f"-Wl,-rpath,{libdir}", "-ldl", "-lpthread"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(built, out)
    return out


def load(mkl: str) -> str:
    """Build and load the shim ahead of `mkl` (the library every call it does not take goes to); returns STATUS.
    Must run before MLX is imported and before `mkl` is loaded globally."""
    global STATUS, _LIB
    if STATUS != "not attempted":
        return STATUS
    if not enabled():
        unset = not os.environ.get("MLXCLIP_ONEDNN")
        STATUS = "off (no AVX-512: MLXCLIP_ONEDNN=1 turns it on)" if unset else "off (MLXCLIP_ONEDNN=0)"
        return STATUS
    dnnl = find_dnnl()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if dnnl is None:
        STATUS = "off (no libdnnl.so.3 found: pip install onednn-cpu-gomp)"
    elif compiler is None:
        STATUS = "off (no C compiler: set CC or install gcc)"
    else:
        try:
            lib = ctypes.CDLL(str(build(dnnl, compiler)), mode=ctypes.RTLD_GLOBAL)
            code = lib.mlxclip_onednn_init(mkl.encode(), ctypes.c_double(min_mnk()))
            if code:
                raise RuntimeError(f"init returned {code} (1: {mkl} did not load, 2: no cblas_sgemm, 3: no engine)")
            lib.mlxclip_onednn_taken.restype = lib.mlxclip_onednn_passed_on.restype = ctypes.c_longlong
            _LIB, STATUS = lib, f"on (oneDNN {dnnl})"
        except (OSError, RuntimeError) as e:
            STATUS = f"off (the shim failed: {e})"
    return STATUS


def counts() -> tuple[int, int]:
    """(sgemm calls oneDNN ran, calls handed to MKL) in this process; (0, 0) when the shim is not loaded."""
    if _LIB is None:
        return 0, 0
    return int(_LIB.mlxclip_onednn_taken()), int(_LIB.mlxclip_onednn_passed_on())
