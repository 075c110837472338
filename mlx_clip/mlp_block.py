"""LayerNorm -> fc1 -> activation -> fc2 with a hand-written backward that keeps two arrays, not five (issue 7).

Differentiated by MLX, the pre-norm MLP keeps its input x, the normalised y (fc1's input), the hidden pre-activation
h, the activation a (fc2's input) and whatever the activation's own backward holds: about 10 activations of
(tokens x width) per layer, a third of a training step's activation memory. Here only x and h are kept; the backward
recomputes y = LayerNorm(x) and a = act(h), two cheap elementwise passes, the way torch.compile's recomputation does.
The matmuls are the same ones MLX's autodiff would run, so the gradients agree to rounding (tests/test_mlp_block.py).

Used when the block's Linear layers are plain, trainable nn.Linear (LoRA, quantized or frozen layers take the
ordinary path: a frozen weight needs no gradient matmul).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams, fastmath, gpu_activation, gpu_reduce, layer_norm as ln, linear


_WEIGHT_AND_BIAS = {"weight", "bias"}


def applies(norm: nn.Module, fc1: nn.Module, fc2: nn.Module) -> bool:
    return plain_and_trainable(norm, fc1, fc2)


def plain_and_trainable(norm: nn.Module, *linears: nn.Module) -> bool:
    """A plain LayerNorm and plain Linear layers, each with a trainable weight and bias (a hand-written backward
    returns every gradient). Checked on every forward call (each layer): one parameter walk per module."""
    return (type(norm) in (nn.LayerNorm, ln.LayerNorm) and all(map(linear.is_plain, linears))
            and all(_WEIGHT_AND_BIAS <= m.trainable_parameters().keys() for m in (norm, *linears)))


def mlp_block(norm: nn.LayerNorm, fc1: nn.Linear, fc2: nn.Linear, activation, x: mx.array) -> mx.array:
    """fc2(activation(fc1(norm(x)))) for (..., D) inputs."""
    fn = cpu_streams.for_current_stream(_block, activation, norm.eps)
    return fn(x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)[0]


def _block(stream, activation, eps: float):
    def layer_norm(x, w, b):
        return ln.layer_norm(x, w, b, eps)

    @mx.custom_function
    def block(x, ln_w, ln_b, w1, b1, w2, b2):
        h = linear.product(layer_norm(x, ln_w, ln_b), w1, b1)
        return linear.product(activation(h), w2, b2), h  # h is returned so the backward gets it without recomputing

    @block.vjp
    def block_vjp(primals, cotangents, outputs):
        with mx.stream(stream):  # the forward's stream (cpu_streams.for_current_stream says why)
            return _block_vjp(activation, eps, primals, cotangents, outputs)

    return block


def _block_vjp(activation, eps: float, primals, cotangents, outputs):
    x, ln_w, ln_b, w1, b1, w2, b2 = primals
    g, h = cotangents[0], outputs[1]
    rows = linear.as_rows  # tokens of every batch row as one matrix
    # The products run on rows, their results shaped back by one reshape each: `g @ w2` on (B, L, D) would flatten
    # and unflatten (2 graph nodes, and a host-bound GPU step pays per node). act(h) and LayerNorm(x) are recomputed
    # on h and x as they are, so that compilation can merge them with the forward's where it keeps those
    g_rows = rows(g)
    g_h = (g_rows @ w2).reshape(h.shape)
    kind = fastmath.GPU_KINDS.get(activation)
    if kind and gpu_activation.applies(h):  # a = act(h) recomputed, and dh: one pass over h (gpu_activation says why)
        a, dh = gpu_activation.value_and_grad(kind, h, g_h)
    else:
        a, (dh,) = _value_and_vjp(activation, [h], g_h)
    dh_rows = rows(dh)
    g_x = (dh_rows @ w1).reshape(x.shape)
    y, dx, d_ln_w, d_ln_b = ln.recomputed(x, ln_w, ln_b, g_x, eps)  # y recomputed, and the LayerNorm's gradients
    dw2, db2 = g_rows.T @ rows(a), gpu_reduce.column_sum(g_rows)  # MLX's sum where the kernel does not apply
    dw1, db1 = dh_rows.T @ rows(y), gpu_reduce.column_sum(dh_rows)
    grads = (d_ln_w, d_ln_b, dw1, db1.astype(b1.dtype), dw2, db2.astype(b2.dtype))
    return (linear.after_weight_grads(dx, *grads), *grads)  # each GEMM where the backward reaches it (linear says why)


def _value_and_vjp(fn, primals: list, cotangent: mx.array):
    """fn(*primals) and its vector-Jacobian product, from one evaluation of fn."""
    (value,), grads = mx.vjp(fn, primals, [cotangent])
    return value, grads
