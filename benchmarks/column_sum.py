"""Micro-benchmark of a column sum (Σ over rows of a (tokens, width) gradient: every bias gradient) on the default
device (issue 7, perf-notes "tried"): MLX's reduction against the product ones(1, N) @ G. In a kernel profile of the
GPU train step MLX's column reductions looked slow (~150 µs each while other kernels ran beside them); alone they are
not (H200: 9 µs for (12800, 768) bf16, the product 39 µs).

    python -m benchmarks.column_sum
"""

import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

SHAPES = [(256 * 50, 768), (256 * 50, 3072), (256 * 32, 512), (256 * 32, 2048)]  # ViT-B/32 images, trimmed text
METHODS = {
    "sum": lambda x: x.sum(axis=0),
    "ones @ x": lambda x: (mx.ones((1, x.shape[0]), x.dtype) @ x).reshape(-1),
}


def _time(fn, x, calls: int = 40) -> float:
    mx.eval([fn(x) for _ in range(3)])
    times = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval([fn(x) for _ in range(calls)])
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def main():
    print(f"device: {mx.default_device()}")
    for shape in SHAPES:
        x = mx.random.normal(shape).astype(mx.bfloat16)
        mx.eval(x)
        row = ", ".join(f"{name} {1e6 * _time(fn, x):.1f} us" for name, fn in METHODS.items())
        print(f"{shape} bf16 ({x.nbytes / 2**20:.0f} MiB): {row}", flush=True)


if __name__ == "__main__":
    main()
