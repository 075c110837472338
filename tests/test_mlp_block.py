"""mlx_clip.mlp_block (pre-norm MLP with a hand-written, recomputing backward) against MLX's autodiff of the same
layers: value and every gradient, both activations, compiled or not; and which layers take it."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_clip import fastmath, layer_norm, mlp_block
from mlx_clip.train.lora import LoRALinear
from block_util import assert_matches_autodiff  # noqa: E402  (tests/ is on sys.path under pytest)
from graph_util import primitives  # noqa: E402


def _layers(seed=0, dims=24, hidden=96):
    mx.random.seed(seed)
    norm, fc1, fc2 = nn.LayerNorm(dims), nn.Linear(dims, hidden), nn.Linear(hidden, dims)
    norm.weight = mx.random.normal((dims,)) * 0.2 + 1
    norm.bias = mx.random.normal((dims,)) * 0.1
    return norm, fc1, fc2


@pytest.mark.parametrize("activation", [fastmath.gelu, fastmath.quick_gelu], ids=["gelu", "quick_gelu"])
@pytest.mark.parametrize("compiled", [False, True])
def test_block_matches_autodiff(activation, compiled):
    norm, fc1, fc2 = _layers()
    x = mx.random.normal((3, 7, 24), key=mx.random.key(1))
    w = mx.random.normal((3, 7, 24), key=mx.random.key(2))
    assert_matches_autodiff({"norm": norm, "fc1": fc1, "fc2": fc2},
                            lambda x: (mlp_block.mlp_block(norm, fc1, fc2, activation, x) * w).sum(),
                            lambda x: (fc2(activation(fc1(norm(x)))) * w).sum(), x, compiled)


def test_only_plain_trainable_layers_take_it():
    norm, fc1, fc2 = _layers()
    assert mlp_block.applies(norm, fc1, fc2)
    fc1.freeze()
    assert not mlp_block.applies(norm, fc1, fc2)  # a frozen weight needs no gradient matmul: the ordinary path
    fc1.unfreeze()
    assert not mlp_block.applies(norm, LoRALinear(fc1, rank=4), fc2)
    assert not mlp_block.applies(norm, nn.QuantizedLinear.from_linear(nn.Linear(64, 96)), fc2)


def test_one_pass_activation_path_matches_autodiff(monkeypatch):
    """The backward's CUDA path (a and dh from gpu_activation.value_and_grad), run here with MLX's ops in place of the
    kernel: autodiff's gradients."""
    calls = []

    def value_and_grad(kind, h, g):
        calls.append(kind)
        (a,), (dh,) = mx.vjp(fastmath.gelu, [h], [g])
        return a, dh

    monkeypatch.setattr(mlp_block.gpu_activation, "applies", lambda h: True)
    monkeypatch.setattr(mlp_block.gpu_activation, "value_and_grad", value_and_grad)
    norm, fc1, fc2 = _layers(3)
    x = mx.random.normal((2, 5, 24), key=mx.random.key(4))
    g = mx.random.normal((2, 5, 24), key=mx.random.key(5))
    params = [x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]

    def run(block):
        def f(x, nw, nb, w1, b1, w2, b2):
            norm.update({"weight": nw, "bias": nb})
            fc1.update({"weight": w1, "bias": b1})
            fc2.update({"weight": w2, "bias": b2})
            if block:
                return mlp_block.mlp_block(norm, fc1, fc2, fastmath.gelu, x)
            return fc2(fastmath.gelu(fc1(norm(x))))
        return mx.vjp(f, params, [g])[1]

    ours, want = run(True), run(False)
    assert calls == ["gelu"]
    for i, (a, b) in enumerate(zip(ours, want)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=str(i))


def test_backward_products_run_on_rows_without_flattening():
    """The backward's four products take (tokens, width) rows made once: no Flatten / Unflatten pair around `g @ w2`
    and `dh @ w1` (MLX's matmul of a (B, L, D) array), which a host-bound GPU step pays per node; the LayerNorm and
    activation recomputed on x and h as they are (so compilation can merge them with the forward's)."""
    norm, fc1, fc2 = _layers()
    x = mx.random.normal((3, 7, 24), key=mx.random.key(1))
    primals = [x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    outputs = mlp_block._block(mx.cpu, fastmath.gelu, norm.eps)(*primals)
    cotangents = [mx.random.normal((3, 7, 24), key=mx.random.key(2)), mx.zeros(outputs[1].shape)]
    mx.eval(primals, outputs, cotangents)  # the backward's graph alone below
    grads = mlp_block._block_vjp(fastmath.gelu, norm.eps, primals, cotangents, outputs)
    names = primitives(*grads)
    # what the two recomputations make by themselves (on this CPU the LayerNorm's row statistics are products of
    # (B, L, D) arrays, flattened by MLX): the block's backward may add products, but no flattening of its own
    h = outputs[1]
    g_h, g_x = (mx.random.normal(t.shape, key=mx.random.key(3)) for t in (h, x))
    mx.eval(g_h, g_x)
    alone = primitives(*mlp_block._value_and_vjp(fastmath.gelu, [h], g_h)[1],
                       *layer_norm.recomputed(x, norm.weight, norm.bias, g_x, norm.eps))
    assert names.count("Matmul") >= alone.count("Matmul") + 4, names
    assert [names.count(v) for v in ("Flatten", "Unflatten")] == [alone.count(v) for v in ("Flatten", "Unflatten")]
