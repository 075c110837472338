"""LayerNorm on the CPU with its statistics on BLAS threads and a hand-written backward (issue 7).

MLX's CPU LayerNorm is a composition of ~8 ops: inside `mx.compile` the per-row `rsqrt(var + eps)` fuses into the
elementwise kernel that broadcasts it, which then evaluates it once per *element* as a scalar libm call, and the row
reductions run on one core. A (800, 768) LayerNorm (ViT-B/32, batch 16) took 2.7 ms, 16× an add of the same arrays; its
backward (MLX's fallback, run op by op) ~20 passes. Here the row means are matrix-vector products (x @ 1/D, on the
BLAS's threads), and the per-row scalars leave the fused kernels through a (rows, 1) @ (1, 1) product, which mx.compile
does not fuse: 0.9 ms for the same LayerNorm, its backward 1.2-2x faster. The variance is taken around the mean (two
passes), as torch does, so inputs with a large mean lose no precision. GPUs keep mx.fast.layer_norm (one fused kernel
there; on CUDA its backward is mlx_clip.gpu_reduce's kernel, whose gain and bias gradients skip MLX's slow column
reductions), and so does the CPU with MLXCLIP_CPU_LAYER_NORM=0.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams, gpu_reduce
from mlx_clip.switches import env_switch


def _row_mean(x: mx.array) -> mx.array:
    """(..., D) -> (..., 1), as one matrix-vector product over all rows (a batched one per leading index is slower)."""
    rows = x.reshape(-1, x.shape[-1]) @ mx.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
    return rows.reshape(*x.shape[:-1], 1)


def _per_row(x: mx.array) -> mx.array:
    # An identity that mx.compile does not fuse through: what is computed before it is computed once per row.
    return x @ mx.ones((1, 1), x.dtype)


def _stats(x: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """Row mean and 1 / standard deviation, each (..., 1)."""
    mean = _row_mean(x)
    centered = x - mean
    return mean, _per_row(mx.rsqrt(_row_mean(centered * centered) + eps))


def column_sum(x: mx.array) -> mx.array:
    """Σ over every axis but the last, (..., D) -> (D,), as a vector-matrix product on the BLAS's threads."""
    rows = x.reshape(-1, x.shape[-1])
    return (mx.ones((1, rows.shape[0]), rows.dtype) @ rows).reshape(-1)


def value_and_grads(x, w, b, cotangent, eps: float):
    """LayerNorm(x)·w + b and the gradients (dx, dw, db) of <cotangent, it>."""
    mean, inv_std = _stats(x, eps)
    normed = (x - mean) * inv_std
    gw = cotangent * w
    dx = inv_std * (gw - _row_mean(gw) - normed * _row_mean(gw * normed))
    return normed * w + b, dx, column_sum(cotangent * normed).astype(w.dtype), column_sum(cotangent).astype(b.dtype)


def _cpu_layer_norm(stream, eps: float):
    @mx.custom_function
    def layer_norm(x, w, b):
        mean, inv_std = _stats(x, eps)
        return (x - mean) * inv_std * w + b

    @layer_norm.vjp
    def layer_norm_vjp(primals, cotangent, output):
        with mx.stream(stream):  # the forward's stream (cpu_streams.for_current_stream says why)
            return value_and_grads(*primals, cotangent, eps)[1:]

    return layer_norm


ENABLED = env_switch("MLXCLIP_CPU_LAYER_NORM", True)


def applies() -> bool:
    """Whether the CPU LayerNorm is used: on the CPU unless switched off (decided when a graph is traced)."""
    return ENABLED and mx.default_device() == mx.cpu


def layer_norm(x: mx.array, w: mx.array, b: mx.array, eps: float) -> mx.array:
    """LayerNorm over the last axis with gain w and bias b (both (D,))."""
    if applies():
        return cpu_streams.for_current_stream(_cpu_layer_norm, eps)(x, w, b)
    if gpu_reduce.layer_norm_applies(x, w) and b.dtype == w.dtype:
        return _gpu_layer_norm(eps)(x, w, b)
    return mx.fast.layer_norm(x, w, b, eps)


@lru_cache(maxsize=None)
def _gpu_layer_norm(eps: float):
    """mx.fast.layer_norm (or gpu_reduce's forward kernel, MLXCLIP_GPU_LAYER_NORM_FORWARD=1) whose backward is
    gpu_reduce's kernel: dx and the gain and bias gradients in one pass over x and g (MLX's writes g·x̂ for every
    element, then runs two slow column reductions)."""

    @mx.custom_function
    def layer_norm(x, w, b):
        if gpu_reduce.LN_FORWARD:
            return gpu_reduce.layer_norm_forward(x, w, b, eps)
        return mx.fast.layer_norm(x, w, b, eps)

    @layer_norm.vjp
    def layer_norm_vjp(primals, cotangent, output):
        x, w, b = primals
        dx, dw, db = gpu_reduce.layer_norm_grads(x, w, cotangent, eps)
        return dx, dw, db.astype(b.dtype)

    return layer_norm


def recomputed(x: mx.array, w: mx.array, b: mx.array, cotangent: mx.array, eps: float):
    """(LayerNorm(x), dx, dw, db) for a backward pass that recomputes the norm instead of keeping it (mlp_block,
    qkv_block): the CPU's formulas above, else the LayerNorm this device runs and its own backward."""
    if applies():
        return value_and_grads(x, w, b, cotangent, eps)
    (y,), (dx, dw, db) = mx.vjp(lambda *p: layer_norm(*p, eps), [x, w, b], [cotangent])
    return y, dx, dw, db


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same checkpoint names) computed as above on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().__call__(x)
