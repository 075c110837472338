"""Run MLX's host work under mimalloc or jemalloc instead of glibc's malloc (Linux, MLX on a GPU).

On a GPU the ViT-B/32 train step is host-bound: the device waits 2-3 ms of a 55-70 ms step while one CPU thread
replays the compiled graph and encodes its ~3,700 kernels, and each graph node allocates and frees small host
objects. On the H200 (benchmarks/results/gpu-s16-h200.md) mimalloc cut that host time by a quarter and the step
with it (`gpu_host`, two rounds: 63.4 / 55.4 ms -> 43.3 / 44.0 ms); no glibc tunable came close. A malloc can only
be swapped when a process starts (LD_PRELOAD), so the CLI re-executes itself once with it set (`ensure`).

On the CPU the same holds for training (`mlxclip finetune`, the bench's train task): the stream threads compute
while the main thread replays the step's ~5,500 nodes, and on 2 cores that thread's glibc malloc work takes time
from them. `small`'s b32 step under mimalloc, alternating processes (session 24, benchmarks/perf-notes.md change
49): 305 / 323 / 319 / 308 / 322 / 333 ms against 355 / 344 / 361 / 335 / 369 / 354, the host thread 44 -> 38 ms a
step; ViT-B-32's, whose host work is ~5% of a 3.3 s step, unchanged. Latency work on the CPU keeps glibc's: there
mimalloc made the single pair slower (benchmarks/results/cpu-s16-pair-malloc.txt).

MLXCLIP_MALLOC picks it:
- unset or "auto": the first of mimalloc, jemalloc found on the system (e.g. `apt install libmimalloc2.0`), when MLX
  runs on a GPU under Linux, or trains on its CPU (TRAINING_COMMANDS); glibc's for the CPU's other work;
- "system": glibc's malloc, never re-execute;
- a path: that library, on any device.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys

from mlx_clip import _libs

# the CLI commands that run MLX long enough for its host work to matter: they re-execute under the chosen malloc
COMMANDS = ("finetune", "serve", "embed", "eval", "memory")
TRAINING_COMMANDS = ("finetune",)  # these also on the CPU (the module docstring says why)
LIBRARIES = ("mimalloc", "jemalloc")  # the order they are preferred in: mimalloc measured a little faster
_REEXEC_GUARD = "MLXCLIP_MALLOC_REEXEC"  # set in the re-executed process: never loop, whatever happens


def _search_dirs() -> list[str]:
    return _libs.prefix_lib_dirs() + ["/usr/local/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                                      "/usr/lib64", "/usr/lib"]


def find(name: str, dirs: list[str] | None = None) -> str | None:
    """The path of lib{name}.so* in the usual library folders (or `dirs`), else None."""
    for folder in _search_dirs() if dirs is None else dirs:
        hits = sorted(glob.glob(os.path.join(folder, f"lib{name}.so*")))
        if hits:
            return hits[0]
    return ctypes.util.find_library(name) if dirs is None else None  # ldconfig's cache: a soname, not a path


def choose(setting: str | None, on_gpu: bool, platform: str = sys.platform,
           dirs: list[str] | None = None, training: bool = False) -> tuple[str | None, str]:
    """(library to preload or None, why): the rule of the module docstring, for MLXCLIP_MALLOC = `setting`, for
    training work (`training`) or other."""
    setting = (setting or "auto").strip()
    if setting == "system":
        return None, "glibc's malloc (MLXCLIP_MALLOC=system)"
    if setting != "auto":
        if not os.path.isfile(setting):
            raise ValueError(f"MLXCLIP_MALLOC={setting!r}: expected 'auto', 'system' or the path of a malloc library "
                             "such as /usr/lib/x86_64-linux-gnu/libmimalloc.so.2, and that file does not exist")
        return setting, "MLXCLIP_MALLOC"
    if not platform.startswith("linux"):
        return None, "the system's malloc (not Linux)"
    if not on_gpu and not training:
        return None, "glibc's malloc (MLX's CPU latency work: mimalloc made the single pair slower there)"
    for name in LIBRARIES:
        path = find(name, dirs)
        if path:
            reason = "MLX on a GPU is host-bound" if on_gpu else "the CPU training step's host thread shares the cores"
            return path, f"{name}: {reason} (MLXCLIP_MALLOC=system keeps glibc's)"
    work = "GPU" if on_gpu else "CPU training"
    return None, f"glibc's malloc (install libmimalloc2.0 or libjemalloc2 for a faster {work} step)"


def _preloads_but(env: dict, library: str | None) -> list[str]:
    """LD_PRELOAD's entries (space- or colon-separated) other than `library`."""
    return [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != library]


def with_preload(env: dict, library: str) -> dict:
    """`env` with `library` first in LD_PRELOAD (kept once)."""
    return dict(env, LD_PRELOAD=" ".join([library, *_preloads_but(env, library)]))


def without_preload(env: dict, library: str | None) -> dict:
    """`env` with `library` taken out of LD_PRELOAD (torch's benchmark process runs as torch users run it)."""
    if not library or "LD_PRELOAD" not in env:
        return dict(env)
    kept = _preloads_but(env, library)
    out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    return dict(out, LD_PRELOAD=" ".join(kept)) if kept else out


def loaded(library: str, maps_path: str = "/proc/self/maps") -> bool:
    """Whether `library` (a path or soname) is mapped into this process."""
    name = os.path.basename(library)
    try:
        with open(maps_path) as f:
            return any(f"/{name}" in line for line in f)  # a mapping's line ends with the file's whole path
    except OSError:
        return False


def in_use(maps_path: str = "/proc/self/maps") -> str:
    """The allocator this process runs under: "mimalloc", "jemalloc" or "system" (for run summaries and bench rows,
    where a step's speed depends on it)."""
    return next((name for name in LIBRARIES if loaded(f"lib{name}.so", maps_path)), "system")


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def current(training: bool = False) -> tuple[str | None, str]:
    """What this process would run under, for training work or other: (library, why), from MLXCLIP_MALLOC and MLX's
    default device."""
    return choose(os.environ.get("MLXCLIP_MALLOC"), on_gpu(), training=training)


def ensure(argv: list[str]) -> None:
    """Re-execute `python -m mlx_clip ARGV` with the chosen malloc preloaded, unless it is loaded already, none is
    chosen, or this is the re-executed process. Returns only when no re-execution is needed."""
    if os.environ.get(_REEXEC_GUARD):
        return
    library, _ = current(training=bool(argv) and argv[0] in TRAINING_COMMANDS)
    if library is None or loaded(library):
        return
    env = dict(with_preload(dict(os.environ), library), **{_REEXEC_GUARD: "1"})
    # `-m mlx_clip` must find this very package, also when it was put on sys.path by hand rather than installed
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [env.get("PYTHONPATH")])])
    sys.stdout.flush()
    sys.stderr.flush()
    # `-m`, not argv[0]: run as a script, mlx_clip/__main__.py would put mlx_clip/ first on sys.path, where io.py
    # shadows the standard library's io
    os.execve(sys.executable, [sys.executable, "-m", "mlx_clip", *argv], env)
