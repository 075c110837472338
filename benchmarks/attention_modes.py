"""GPU attention modes (`MLXCLIP_GPU_ATTENTION`, mlx_clip/fastmath.py): forward + backward time, peak memory and the
largest gradient difference against plain `mx.fast.scaled_dot_product_attention`, bf16, on the projections' (B, L, D)
layout as the model calls it (head split and merge included), at CLIP's shapes
(ViT-B/32 image 50 tokens, trimmed text 32 causal, ViT-B/16 image 197, full text 77 causal; batch 256).

    python -m benchmarks.attention_modes        # on a GPU; results/attention-modes-h100.md has the H100 numbers
"""

import time

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)
import mlx.core as mx
import numpy as np

from mlx_clip import fastmath

SHAPES = (((256, 12, 50, 64), None), ((256, 8, 32, 64), "causal"), ((256, 12, 197, 64), None),
          ((256, 8, 77, 64), "causal"))


def compiled_step(shape, mask, mode):
    """A callable running one compiled value_and_grad of a weighted sum of the attention output (under `mode`),
    returning (value, grads)."""
    fastmath.GPU_ATTENTION = mode
    batch, heads, length, width = shape
    tokens = (batch, length, heads * width)  # the projections' layout, as the model calls it (head split included)
    q, k, v = (mx.random.normal(tokens, key=mx.random.key(i)).astype(mx.bfloat16) for i in range(3))
    g = mx.random.normal(tokens, key=mx.random.key(9)).astype(mx.bfloat16)
    mx.eval(q, k, v, g)  # evaluated first: a lazy random array captured by a compiled function is regenerated per call

    def loss(q, k, v):
        return (fastmath.token_attention(q, k, v, heads, 0.125, mask).astype(mx.float32) * g).sum()

    step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))

    def once():
        out = step(q, k, v)
        mx.eval(out)
        return out

    return once


def run(shape, mask, mode, runs: int = 20, step=None):
    """((value, grads), median ms, peak MiB) of value_and_grad of a weighted sum of the attention output (`step`: one
    compiled_step already made for these arguments)."""
    step = step or compiled_step(shape, mask, mode)
    out = step()
    for _ in range(3):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    mx.reset_peak_memory()
    step()
    return out, 1e3 * float(np.median(times)), mx.get_peak_memory() / 2**20


def max_rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.abs(a - b).max() / (mx.abs(a).max() + 1e-9))


def main():
    for shape, mask in SHAPES:
        (_, base), t0, p0 = run(shape, mask, "sdpa")
        line = f"{shape} {mask}: sdpa {t0:.2f} ms {p0:.0f} MiB"
        for mode in ("matmul", "padded", "fused", "aligned"):
            (_, grads), t1, p1 = run(shape, mask, mode)
            err = max(max_rel(a, b) for a, b in zip(base, grads))
            line += f" | {mode} {t1:.2f} ms {p1:.0f} MiB err {err:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
