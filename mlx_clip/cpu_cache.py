"""MLX's CPU buffer cache, opt-in larger than MLX's 32 MB default (MLXCLIP_CPU_CACHE).

MLX's CPU allocator keeps freed buffers for reuse only up to its cache limit (32 MB unless set); past it, buffers go
back to `malloc`, which hands large blocks back to the OS, so the next step faults the pages in again (the kernel
zero-fills each one). A ViT-B/32 training step frees and re-allocates about one parameter set's worth of buffers: at
the default limit 150k page faults per batch-16 step. With MLXCLIP_CPU_CACHE=2GB they are gone, but measured A/B in
alternating processes the step got only 1-3% faster (5.31 -> 5.24 s, 5.14 -> 4.97 s) while peak RSS rose from 3.26 to
4.15 GiB, because cached buffers of one size cannot serve a request of another. So it is off by default
(benchmarks/perf-notes.md, change 9).

MLXCLIP_CPU_CACHE sets the limit at `import mlx_clip` ("2GB", "800MB", bytes; unset or "0" keeps MLX's default). A
limit the program already set itself (anything but MLX's default) is left alone. GPU builds are untouched: their
allocators already cache up to the memory limit.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

MLX_CPU_DEFAULT = 32 << 20  # mlx/backend/common allocator's cache_limit_


def _cpu_only_build() -> bool:
    gpu = getattr(mx, "cuda", None)
    return not mx.metal.is_available() and not (gpu is not None and gpu.is_available())


def wanted_limit() -> int:
    text = os.environ.get("MLXCLIP_CPU_CACHE", "").strip()
    if text in ("", "0", "none", "default"):
        return MLX_CPU_DEFAULT
    from mlx_clip.memory import parse_bytes  # only when asked: memory.py pulls in mlx.nn

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise ValueError(f"MLXCLIP_CPU_CACHE: {exc}") from None


def current_limit() -> int:
    """The cache limit in force (MLX has no getter: read by setting, then put back)."""
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def configure() -> int | None:
    """Set the CPU cache limit asked for (see the module docstring); returns the limit now in force, None on a GPU
    build."""
    if not _cpu_only_build():
        return None
    try:
        limit = wanted_limit()
    except ValueError as exc:  # at import time: say so and go on with the default rather than fail every command
        warnings.warn(f"{exc}; keeping MLX's default", stacklevel=2)
        limit = MLX_CPU_DEFAULT
    previous = mx.set_cache_limit(limit)
    if previous != MLX_CPU_DEFAULT:  # the program chose its own limit before importing us: keep it
        mx.set_cache_limit(previous)
        return previous
    return limit
