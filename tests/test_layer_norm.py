"""mlx_clip.layer_norm (the CPU LayerNorm: statistics as matrix-vector products, hand-written backward) against float64
torch: values and gradients, compiled and not, inputs far from zero mean; the module against nn.LayerNorm."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip import layer_norm as ln

torch = pytest.importorskip("torch")


def _reference(x, w, b, r, eps):
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    out = torch.nn.functional.layer_norm(tx, (x.shape[-1],), tw, tb, eps)
    (out * torch.tensor(r, dtype=torch.float64)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in (tx, tw, tb)]


def _ours(x, w, b, r, eps, compiled):
    def loss(x, w, b):
        return (ln.layer_norm(x, w, b, eps) * mx.array(r)).sum()

    value_and_grad = mx.value_and_grad(loss, argnums=[0, 1, 2])
    forward = lambda x, w, b: ln.layer_norm(x, w, b, eps)  # noqa: E731
    if compiled:
        value_and_grad, forward = mx.compile(value_and_grad), mx.compile(forward)
    arrays = [mx.array(a) for a in (x, w, b)]
    _, grads = value_and_grad(*arrays)
    return np.array(forward(*arrays)), [np.array(g) for g in grads]


@pytest.mark.parametrize("shape,mean,compiled", [((16, 50, 768), 0.0, True), ((2080, 192), 0.0, False),
                                                 ((3, 7, 64), 50.0, True), ((1, 5, 512), -3.0, False)])
def test_values_and_gradients_match_float64(shape, mean, compiled):
    rng = np.random.default_rng(shape[-1])
    x = (mean + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(shape[-1])).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32)
    r = rng.standard_normal(shape).astype(np.float32)
    want_out, want_grads = _reference(x, w, b, r, 1e-5)
    got_out, got_grads = _ours(x, w, b, r, 1e-5, compiled)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=2e-5)
    for name, got, want in zip(("dx", "dw", "db"), got_grads, want_grads):
        assert np.linalg.norm(got - want) <= 2e-5 * np.linalg.norm(want), name


def test_module_matches_mlx_layer_norm_and_keeps_names():
    ours, theirs = ln.LayerNorm(96, eps=1e-6), nn.LayerNorm(96, eps=1e-6)
    assert isinstance(ours, nn.LayerNorm)
    rng = np.random.default_rng(0)
    ours.update({"weight": mx.array(rng.standard_normal(96).astype(np.float32)),
                 "bias": mx.array(rng.standard_normal(96).astype(np.float32))})
    theirs.update(ours.parameters())
    assert set(dict(tree_flatten(ours.parameters()))) == {"weight", "bias"}
    x = mx.array(rng.standard_normal((4, 9, 96)).astype(np.float32))
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), rtol=1e-5, atol=1e-5)
    plain = ln.LayerNorm(96, affine=False)  # no gain or bias: MLX's own path
    np.testing.assert_allclose(np.array(plain(x)), np.array(mx.fast.layer_norm(x, None, None, 1e-5)), atol=1e-6)
