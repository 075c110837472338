"""Shared check for the hand-written backward passes (mlp_block, qkv_block): the same loss and gradients as MLX's
autodiff of the plain layers."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def assert_matches_autodiff(modules: dict, block, plain, x: mx.array, compiled: bool):
    """`block(x)` and `plain(x)`, two scalar losses over the same `modules` (the hand-written path and the plain
    layers), give the same value and gradients w.r.t. x and every parameter, compiled or not."""
    params = {name: m.parameters() for name, m in modules.items()}

    def loss(fn):
        def f(params, x):
            for name, m in modules.items():
                m.update(params[name])
            return fn(x)
        f = mx.value_and_grad(f, argnums=(0, 1))
        return mx.compile(f) if compiled else f

    (got, (got_p, got_x)), (want, (want_p, want_x)) = loss(block)(params, x), loss(plain)(params, x)
    for m, p in zip(modules.values(), params.values()):
        m.update(p)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    np.testing.assert_allclose(np.array(got_x), np.array(want_x), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(tree_flatten(got_p), tree_flatten(want_p)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=name)
