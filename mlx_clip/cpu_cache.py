"""MLX's CPU buffer cache, sized for training rather than MLX's 32 MB default.

MLX's CPU allocator keeps freed buffers for reuse only up to its cache limit (32 MB unless set); past it, buffers go
back to `malloc`, which hands large blocks back to the OS, so the next step faults every page in again (the kernel
zero-fills each one). A ViT-B/32 training step frees and re-allocates about one parameter set's worth of buffers
(~600 MB): at the default limit that was 150k page faults and 0.7 s of kernel time per step, batch-16 step 7.4 s ->
5.4 s with the cache raised (benchmarks/perf-notes.md). The cache never holds more than what was in use at the peak,
so the raise costs no peak memory; it only keeps that memory mapped between steps.

MLXCLIP_CPU_CACHE sets the limit ("4GB", "800MB", bytes; "0" keeps MLX's default); by default a quarter of RAM.
A limit the program already set itself (anything but MLX's default) is left alone. GPU builds are untouched: their
allocators already cache up to the memory limit.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

MLX_CPU_DEFAULT = 32 << 20  # mlx/backend/common allocator's cache_limit_
RAM_FRACTION = 0.25


def _cpu_only_build() -> bool:
    gpu = getattr(mx, "cuda", None)
    return not mx.metal.is_available() and not (gpu is not None and gpu.is_available())


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def wanted_limit() -> int:
    text = os.environ.get("MLXCLIP_CPU_CACHE", "").strip()
    if not text:
        return int(RAM_FRACTION * _ram_bytes())
    if text in ("0", "none", "default"):
        return MLX_CPU_DEFAULT
    from mlx_clip.memory import parse_bytes  # only when asked: memory.py pulls in mlx.nn

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise ValueError(f"MLXCLIP_CPU_CACHE: {exc}") from None


def configure() -> int | None:
    """Raise the CPU cache limit once (see the module docstring); returns the limit now in force, None on a GPU build."""
    if not _cpu_only_build():
        return None
    try:
        limit = wanted_limit()
    except ValueError as exc:  # at import time: say so and go on with the default rather than fail every command
        warnings.warn(f"{exc}; using a quarter of RAM", stacklevel=2)
        limit = int(RAM_FRACTION * _ram_bytes())
    previous = mx.set_cache_limit(limit)
    if previous != MLX_CPU_DEFAULT:  # the program chose its own limit before importing us: keep it
        mx.set_cache_limit(previous)
        return previous
    return limit
