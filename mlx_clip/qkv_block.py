"""LayerNorm -> q, k, v projections with a hand-written backward that keeps the block's input, not the normalised
activations (issue 7; opt-in, MLXCLIP_QKV_BLOCK=1: an H200's ViT-B/32 step measured no gain, 89.7 vs 82.0 ms).

Differentiated by MLX, the attention half of a pre-norm block keeps y = LayerNorm(x), the three projections' input,
for their weight gradients: one (tokens x width) activation per layer (77.5 MB a ViT-B/16 layer at batch 256, ~1 GB a
step with the text tower), on top of x, which the block keeps anyway. Here y is recomputed in the backward from x, as
mlp_block does for the MLP's LayerNorm and torch.compile's recomputation does for both: one more LayerNorm a layer.
The weight gradients come row-major like the weights (gᵀ y), so the clip norm and AdamW read them in order. The
matmuls are the ones autodiff would run, so the gradients agree to rounding (tests/test_qkv_block.py).

Used when the LayerNorm and the three Linear layers are plain and trainable (LoRA, quantized or frozen layers take the
ordinary path).
"""

from __future__ import annotations

import operator
from functools import reduce

import mlx.core as mx

from mlx_clip import cpu_streams, gpu_reduce, layer_norm as ln, linear, mlp_block
from mlx_clip.switches import env_switch

ENABLED = env_switch("MLXCLIP_QKV_BLOCK", False)  # read when a graph is traced


def applies(norm, *projections) -> bool:
    return ENABLED and mlp_block.plain_and_trainable(norm, *projections)


def qkv_block(norm, q_proj, k_proj, v_proj, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(q, k, v) = the three projections of LayerNorm(x), each (..., D)."""
    fn = cpu_streams.for_current_stream(_block, norm.eps)
    return fn(x, norm.weight, norm.bias, *(t for p in (q_proj, k_proj, v_proj) for t in (p.weight, p.bias)))


def _block(stream, eps: float):
    @mx.custom_function
    def block(x, ln_w, ln_b, *weights_and_biases):
        y = ln.layer_norm(x, ln_w, ln_b, eps)
        pairs = zip(weights_and_biases[::2], weights_and_biases[1::2])
        return tuple(linear.product(y, w, b) for w, b in pairs)  # the products the plain layers run

    @block.vjp
    def block_vjp(primals, cotangents, outputs):
        with mx.stream(stream):  # the forward's stream (cpu_streams.for_current_stream says why)
            return _block_vjp(eps, primals, cotangents)

    return block


def _block_vjp(eps: float, primals, cotangents):
    x, ln_w, ln_b, *weights_and_biases = primals
    weights, biases = weights_and_biases[::2], weights_and_biases[1::2]
    rows = linear.as_rows  # tokens of every batch row as one matrix (the towers hand them over as rows already)
    dy = reduce(operator.add, (g @ w for g, w in zip(cotangents, weights)))  # no 0 + ...: one add fewer a layer
    y, dx, d_ln_w, d_ln_b = ln.recomputed(x, ln_w, ln_b, dy.astype(x.dtype), eps)
    grads = []
    for g, w, b in zip(cotangents, weights, biases):
        grads += [(rows(g).T @ rows(y)).astype(w.dtype), gpu_reduce.column_sum(rows(g)).astype(b.dtype)]
    return (dx, d_ln_w, d_ln_b, *grads)
