"""Micro-benchmark of the gradients' column sums on the default device (issue 7, perf-notes change 30): a bias
gradient (Σ over rows of a (tokens, width) gradient) by MLX's reduction, by the product ones(1, N) @ G, and by
mlx_clip.gpu_reduce's kernel; and a LayerNorm backward (dx and the gain and bias gradients) and forward by MLX's and
by ours.
Shapes: ViT-B/16's and ViT-B/32's image tokens at batch 256, trimmed text.

    python -m benchmarks.column_sum
"""

import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_clip import gpu_reduce, layer_norm

SHAPES = [(256 * 197, 768), (256 * 197, 3072), (256 * 50, 768), (256 * 50, 3072), (256 * 32, 512), (256 * 32, 2048)]
METHODS = {
    "sum": lambda x: x.sum(axis=0),
    "ones @ x": lambda x: (mx.ones((1, x.shape[0]), x.dtype) @ x).reshape(-1),
    "ours": gpu_reduce.column_sum,
}


def _layer_norm_backward(ours: bool):
    def backward(x, w, b, g):
        fn = (lambda *p: layer_norm.layer_norm(*p, 1e-5)) if ours else (lambda *p: mx.fast.layer_norm(*p, 1e-5))
        return mx.vjp(fn, [x, w, b], [g])[1]
    return backward


def time_call(fn, args, calls: int = 40) -> float:
    """Median seconds of one `fn(*args)` evaluated alone (5 rounds of `calls` calls, after 3 warm-up calls)."""
    mx.eval([fn(*args) for _ in range(3)])
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            mx.eval(fn(*args))  # one at a time: independent calls in one eval would overlap on the device
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def main():
    print(f"device: {mx.default_device()}")
    for shape in SHAPES:
        x = mx.random.normal(shape).astype(mx.bfloat16)
        mx.eval(x)
        seconds = {name: time_call(fn, (x,)) for name, fn in METHODS.items()}
        row = ", ".join(f"{name} {1e6 * s:.1f} us" for name, s in seconds.items())
        print(f"column sum {shape} bf16 ({x.nbytes / 2**20:.0f} MiB, {x.nbytes / 1e9 / seconds['ours']:.0f} GB/s ours): "
              f"{row}", flush=True)
    for shape in SHAPES[::2]:
        x, g = (mx.random.normal(shape).astype(mx.bfloat16) for _ in range(2))
        w, b = mx.ones(shape[-1:], mx.bfloat16), mx.zeros(shape[-1:], mx.bfloat16)
        mx.eval(x, g, w, b)
        mlx_us, ours_us = (1e6 * time_call(_layer_norm_backward(o), (x, w, b, g)) for o in (False, True))
        print(f"layer norm backward {shape} bf16: mlx {mlx_us:.1f} us, ours {ours_us:.1f} us", flush=True)
        mlx_us, ours_us = (1e6 * time_call(f, (x, w, b, 1e-5)) for f in (mx.fast.layer_norm,
                                                                          gpu_reduce.layer_norm_forward))
        print(f"layer norm forward {shape} bf16: mlx {mlx_us:.1f} us, ours {ours_us:.1f} us", flush=True)


if __name__ == "__main__":
    main()
