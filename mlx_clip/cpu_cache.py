"""MLX's CPU buffer cache: larger than MLX's 32 MB default for CPU training runs, or as MLXCLIP_CPU_CACHE says.

MLX's CPU allocator keeps freed buffers for reuse only up to its cache limit (32 MB unless set); past it, buffers go
back to `malloc`, which hands large blocks back to the OS, so the next step faults the pages in again (the kernel
zero-fills each one). A ViT-B/32 training step frees and re-allocates about one parameter set's worth of buffers: at
the default limit 150k page faults per batch-16 step. With MLXCLIP_CPU_CACHE=2GB they are gone, but measured A/B in
alternating processes the step got only 1-3% faster (5.31 -> 5.24 s, 5.14 -> 4.97 s) while peak RSS rose from 3.26 to
4.15 GiB, because cached buffers of one size cannot serve a request of another. So it is off by default
(benchmarks/perf-notes.md, change 9).

Re-measured once the step's other waste was gone (session 9, perf-notes change 25): at 1 GB the ViT-B-32 b16 step ran
4,101 / 4,011 / 3,854 -> 3,611 / 3,878 / 3,620 ms (alternating processes), peak RSS 2.73 -> 3.10 GiB, and 3,848 ->
3,675 ms alternating in one process; `small` b32 385 / 377 / 416 -> 367 / 357 / 392 ms. So a CPU training run
(`finetune`, and the bench's train workload as the product's choice) raises the limit to TRAINING_LIMIT for its
duration (`for_training`); other work keeps MLX's default.

MLXCLIP_CPU_CACHE sets the limit at `import mlx_clip` ("2GB", "800MB", bytes; unset or "0" keeps MLX's default). A
limit the program already set itself (anything but MLX's default) is left alone. GPU builds are untouched: their
allocators already cache up to the memory limit.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import mlx.core as mx

from mlx_clip import gpu_buffers

MLX_CPU_DEFAULT = 32 << 20  # mlx/backend/common allocator's cache_limit_
TRAINING_LIMIT = 1 << 30  # measured above: the step's freed buffers kept for the next one, +0.4 GiB peak RSS


def _cpu_only_build() -> bool:
    return not mx.metal.is_available() and not gpu_buffers.cuda_available()


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


def training_limit() -> int | None:
    """The limit a CPU training run raises the cache to: TRAINING_LIMIT, or None where it stays as it is (a GPU
    build, MLXCLIP_CPU_CACHE set, a limit the program chose itself)."""
    if not _cpu_only_build() or os.environ.get("MLXCLIP_CPU_CACHE", "").strip():
        return None
    return TRAINING_LIMIT if current_limit() == MLX_CPU_DEFAULT else None


@contextlib.contextmanager
def for_training():
    """The body (a training run) with the cache at `training_limit()`, the previous limit put back after it."""
    limit = training_limit()
    previous = mx.set_cache_limit(limit) if limit is not None else None
    try:
        yield
    finally:
        if previous is not None:
            mx.set_cache_limit(previous)
