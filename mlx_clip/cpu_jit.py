"""Flags for MLX's CPU kernel compiler, so the fused elementwise loops it builds are vectorised.

On the CPU, `mx.compile` writes each fused elementwise kernel as C++ and builds it with
`g++ -std=c++17 -O3 -Wall -fPIC -shared SRC -o LIB` (mlx/backend/cpu/jit_compiler.cpp; the Linux wheels add nothing).
At those flags g++ leaves three common shapes of loop scalar:
- a `sqrt` (C's errno contract: a branch and a library call per element),
- a `where` whose branches hold floating-point work (it may trap, so g++ will not if-convert it),
- a kernel with many inputs and outputs (each input is its own pointer, and g++ gives up past 10 overlap checks).
AdamW's fused update has all three: 4.2 ns per parameter scalar against 0.9 ns vectorised (memory bound) on the
development VM, ~0.3 s of a 4.8 s ViT-B/32 step (benchmarks/perf-notes.md, change 18).

MLX finds `g++` on PATH, so `enable` puts a small `g++` wrapper first on PATH. It adds flags that change no value
(no errno, no trap semantics, more overlap checks, AVX2 where the CPU has it, no FMA contraction) to MLX's kernel
builds only, recognised by their directory, and passes every other compiler call through untouched (torch.compile's
C++ builds included). MLX caches a built kernel under a name made from its graph alone, so kernels built with these
flags get a directory of their own: TMPDIR points at a subdirectory of the temporary directory (MLX keeps its kernels
in TMPDIR/mlx/VERSION/cpu; child processes' temporary files land there too). Linux only (clang, which g++ is on
macOS, rejects `--param`); MLXCLIP_CPU_JIT=0 switches it off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile

from mlx_clip.switches import env_switch

_BASE_FLAGS = ("-fno-math-errno", "-fno-trapping-math", "--param=vect-max-version-for-alias-checks=200",
               "-ffp-contract=off")
_DIR_PREFIX = "mlxclip-jit-"

# What enable() did, for `mlxclip doctor` and bench results: the flags added, or why none are; and where MLX's
# kernels go while it is on.
STATUS = "not attempted"
KERNEL_DIR: str | None = None


def flags() -> tuple[str, ...]:
    """The flags added to MLX's kernel builds on this machine."""
    return _BASE_FLAGS + (("-mavx2",) if cpu_has("avx2") else ())


def cpu_has(feature: str) -> bool:
    """Whether /proc/cpuinfo lists `feature` (e.g. avx2, avx512f); False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and feature in line.split() for line in f)
    except OSError:
        return False


def wrapper_script(real_compiler: str, kernel_dir: str, extra: tuple[str, ...]) -> str:
    """A POSIX sh `g++` that appends `extra` when the command names a file under `kernel_dir`, else runs unchanged.
    A build that fails with the flags (a compiler that rejects one) is run again as MLX asked for it."""
    return (
        "#!/bin/sh\n"
        "# mlx-clip (mlx_clip/cpu_jit.py): flags for MLX's CPU kernel builds; other compiles pass through unchanged.\n"
        f'case "$*" in\n  *"{kernel_dir}/"*) "{real_compiler}" "$@" {" ".join(extra)} >/dev/null 2>&1 && exit 0 ;;\nesac\n'
        f'exec "{real_compiler}" "$@"\n'
    )


def _write_executable(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)  # atomic: a compile running in another process never sees half a script


def enable() -> str:
    """Install the wrapper and the kernel directory for this process (and its children); returns STATUS."""
    global STATUS
    if STATUS != "not attempted":
        return STATUS
    if not env_switch("MLXCLIP_CPU_JIT", True):
        STATUS = "off (MLXCLIP_CPU_JIT=0)"
    elif not sys.platform.startswith("linux"):
        STATUS = "off (Linux only)"
    else:
        STATUS = _install()
    return STATUS


def _install() -> str:
    global KERNEL_DIR
    extra = flags()
    tag = hashlib.sha256(" ".join(extra).encode()).hexdigest()[:12]
    temp = tempfile.gettempdir()
    if os.path.basename(temp).startswith(_DIR_PREFIX):  # a child of a process that did this already
        temp = os.path.dirname(temp)
    root = os.path.join(temp, f"{_DIR_PREFIX}{os.getuid()}-{tag}")  # per user: MLX writes its kernels in there
    bin_dir, kernel_dir = os.path.join(root, "bin"), os.path.join(root, "mlx")
    # PATH without our wrappers (a child process inherits the PATH set below): where the real g++ is found
    entries = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and _DIR_PREFIX not in p]
    real = shutil.which("g++", path=os.pathsep.join(entries))
    if real is None:
        return "off (no g++ on PATH: MLX cannot compile CPU kernels either)"
    try:
        os.makedirs(bin_dir, exist_ok=True)
        _write_executable(os.path.join(bin_dir, "g++"), wrapper_script(real, kernel_dir, extra))
        if not os.access(root, os.W_OK):
            raise PermissionError("not writable")
    except OSError as e:
        return f"off (cannot write {root}: {e})"
    os.environ["PATH"] = os.pathsep.join([bin_dir, *entries])
    os.environ["TMPDIR"] = root  # read by MLX at each kernel build (and by child processes)
    KERNEL_DIR = kernel_dir
    return f"on: {' '.join(extra)}"
