"""Micro-benchmark of the MLP's activation on the default device (issue 7, perf-notes change 31): GELU's forward and
its backward with the activation recomputed (what mlp_block's backward needs: a = gelu(h) and dh = g · gelu'(h)),
by MLX's compiled ops and by mlx_clip.gpu_activation's kernels. Shapes: the MLP hidden of ViT-B/16's and ViT-B/32's
images and of 77-token captions at batch 256.

    python -m benchmarks.activation
"""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import mlx.nn as nn

from benchmarks.column_sum import time_call
from mlx_clip import gpu_activation

SHAPES = [(256 * 197, 3072), (256 * 50, 3072), (256 * 77, 2048)]


@mx.compile
def _mlx_value_and_grad(h, g):
    (a,), (dh,) = mx.vjp(nn.gelu, [h], [g])
    return a, dh


METHODS = {
    "forward": {"mlx": mx.compile(nn.gelu), "ours": lambda h, g: gpu_activation.value("gelu", h)},
    "value and grad": {"mlx": _mlx_value_and_grad, "ours": lambda h, g: gpu_activation.value_and_grad("gelu", h, g)},
}


def main():
    print(f"device: {mx.default_device()}")
    for shape in SHAPES:
        h, g = (mx.random.normal(shape).astype(mx.bfloat16) for _ in range(2))
        mx.eval(h, g)
        for what, methods in METHODS.items():
            args = {"mlx": (h,) if what == "forward" else (h, g), "ours": (h, g)}
            us = {name: 1e6 * time_call(fn, args[name]) for name, fn in methods.items()}
            passes = 2 if what == "forward" else 4  # arrays of h's size read or written at the least
            print(f"gelu {what} {shape} bf16: mlx {us['mlx']:.1f} us, ours {us['ours']:.1f} us "
                  f"({passes * h.nbytes / 1e3 / us['ours']:.0f} GB/s ours)", flush=True)


if __name__ == "__main__":
    main()
