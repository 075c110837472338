"""mlx_clip.qkv_block (LayerNorm -> q, k, v projections with a hand-written, recomputing backward) against MLX's
autodiff of the same layers: values and every gradient, compiled or not; which layers take it; the encoder layer
through it. The whole model's loss gradients with it on are checked against open_clip in tests/test_parity.py."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip import qkv_block
from mlx_clip.config import VisionConfig
from mlx_clip.model import EncoderLayer
from mlx_clip.train.lora import LoRALinear
from block_util import assert_matches_autodiff  # noqa: E402  (tests/ is on sys.path under pytest)


def _layers(seed=0, dims=32):
    mx.random.seed(seed)
    norm = nn.LayerNorm(dims)
    norm.weight = mx.random.normal((dims,)) * 0.2 + 1
    norm.bias = mx.random.normal((dims,)) * 0.1
    return norm, *(nn.Linear(dims, dims) for _ in range(3))


@pytest.mark.parametrize("compiled", [False, True])
def test_block_matches_autodiff(monkeypatch, compiled):
    monkeypatch.setattr(qkv_block, "ENABLED", True)
    norm, q, k, v = _layers()
    x = mx.random.normal((3, 9, 32), key=mx.random.key(1))
    w = [mx.random.normal((3, 9, 32), key=mx.random.key(2 + i)) for i in range(3)]
    assert_matches_autodiff({"norm": norm, "q": q, "k": k, "v": v},
                            lambda x: sum((o * t).sum() for o, t in zip(qkv_block.qkv_block(norm, q, k, v, x), w)),
                            lambda x: sum((p(norm(x)) * t).sum() for p, t in zip((q, k, v), w)), x, compiled)


def test_only_plain_trainable_layers_take_it_and_only_when_on(monkeypatch):
    norm, q, k, v = _layers()
    assert not qkv_block.applies(norm, q, k, v)  # opt-in
    monkeypatch.setattr(qkv_block, "ENABLED", True)
    assert qkv_block.applies(norm, q, k, v)
    k.freeze()
    assert not qkv_block.applies(norm, q, k, v)  # a frozen weight needs no gradient product: the ordinary path
    k.unfreeze()
    assert not qkv_block.applies(norm, q, LoRALinear(k, rank=4), v)


def test_encoder_layer_gives_the_same_output_and_gradients_with_it(monkeypatch):
    """An encoder layer (the towers' block) with the q/k/v block on and off: the same output and parameter gradients,
    causal mask included, and the block is what runs when on."""
    cfg = VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1)
    mx.random.seed(3)
    layer = EncoderLayer(cfg)
    x = mx.random.normal((2, 11, 64))
    calls = []
    real = qkv_block.qkv_block
    monkeypatch.setattr(qkv_block, "qkv_block", lambda *a: calls.append(1) or real(*a))

    def run(on):
        monkeypatch.setattr(qkv_block, "ENABLED", on)
        f = nn.value_and_grad(layer, lambda m, x: (m(x, "causal") ** 2).sum())
        return f(layer, x)

    (got, got_g), (want, want_g) = run(True), run(False)
    assert calls == [1]
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    for (name, a), (_, b) in zip(tree_flatten(got_g), tree_flatten(want_g)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=name)
