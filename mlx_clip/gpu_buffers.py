"""MLX's CUDA command buffers: 1,000 kernels a buffer where MLX runs on CUDA, unless MLX_MAX_OPS_PER_BUFFER says.

MLX's CUDA backend records an evaluation's kernels into CUDA graphs and commits one (instantiate or update, launch)
each time it holds MLX_MAX_OPS_PER_BUFFER kernels or MLX_MAX_MB_PER_BUFFER Mi input elements, with at most 10
committed buffers in flight (`mlx/backend/cuda/device.cpp` `get_graph_limits`: 100 kernels and 1,000 on an H100 /
H200). A train step is ~3,700 kernels, so ~37 commits, and with 10 in flight the host blocks on the device many
times a step. ViT-B/32's queued step is its host's time (perf-notes changes 41-43), and on the H200 of session 23,
MLX alone, separate processes (`benchmarks/results/gpu-s23-h200.md`): MLX's 100 gave 60.6 / 59.6 / 64.8 ms (host
58-64 ms), 1,000 gave 37.5 / 41.3 ms (host 36-39 ms), peak 7.3-9.8 -> 10.2-11.3 GiB (a host that keeps up runs
further ahead: session 22's 40.2 ms default row peaked at 10.8 GiB). So a CUDA run takes 1,000 (perf-notes change 45).

The element bound stays MLX's (1,000 Mi input elements on an H200): each kernel's inputs live until its buffer
completes, so smaller buffers free the backward's activations sooner. MLX_MAX_MB_PER_BUFFER=400 took ViT-B/16's peak
23.3 -> 18.3 GiB with 1,000 kernels a buffer (17.8 with 100; torch.compile's 19.4) for +4% step time (98.3 -> 101.9
ms), but ViT-B/32's step 37.5 / 41.3 -> 51.5 ms: a memory setting, not a default.

MLX reads both variables once, when a stream's first command encoder is made, so `import mlx_clip` sets the default
(`configure`) before any GPU work; a program that evaluated on the GPU before importing mlx_clip keeps MLX's.
Metal (its own per-chip defaults, not measured here) and the CPU are left alone. Set MLX_MAX_OPS_PER_BUFFER=100 for
MLX's H100 / H200 default.
"""

from __future__ import annotations

import os

import mlx.core as mx

VARIABLE = "MLX_MAX_OPS_PER_BUFFER"
CUDA_OPS_PER_BUFFER = 1000  # measured above; MLX's default 100 (sm_90)


def cuda_available() -> bool:
    gpu = getattr(mx, "cuda", None)  # absent from MLX builds without the CUDA backend
    return gpu is not None and gpu.is_available()


def wanted(env: dict, cuda: bool) -> str | None:
    """The MLX_MAX_OPS_PER_BUFFER to set, or None to leave the environment as it is (not CUDA, or set already). A
    blank value counts as unset: MLX would read it as 0 (`atoi`), a commit after every kernel."""
    if not cuda or env.get(VARIABLE, "").strip():
        return None
    return str(CUDA_OPS_PER_BUFFER)


def configure(env: dict | None = None, cuda: bool | None = None) -> str | None:
    """Set the CUDA default in `env` (os.environ by default, so child processes such as the bench's workers get it
    too); returns the value in force, None where MLX's own applies."""
    env = os.environ if env is None else env
    cuda = cuda_available() if cuda is None else cuda
    value = wanted(env, cuda)
    if value is not None:
        env[VARIABLE] = value
    return env.get(VARIABLE) if cuda else None


def in_force() -> str | None:
    """MLX_MAX_OPS_PER_BUFFER as this process's CUDA backend reads it; None off CUDA (`mlxclip doctor`)."""
    return os.environ.get(VARIABLE) if cuda_available() else None
