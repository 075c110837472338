"""The towers' blocks run on (tokens, width) rows (model.EncoderLayer.rows): every dense layer but the pooled last
block's takes a matrix, and a block called on (B, L, D) gives the same numbers as its modules composed by hand."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np

from mlx_clip import linear
from mlx_clip.config import get_config
from mlx_clip.model import CLIP


def test_dense_layers_of_all_but_the_pooled_block_take_rows(monkeypatch):
    """MLX's addmm of a (B, L, D) input reshapes it and its result, and the backward each again: a host-bound GPU
    step pays per graph node. The image tower of `tiny` (2 blocks, the last pooled): the first block's six dense
    layers (q, k, v, out, fc1, fc2) get (B·L, D) rows, the pooled block's may not."""
    seen = []
    product = linear.product
    monkeypatch.setattr(linear, "product", lambda x, *a, **k: seen.append(x.ndim) or product(x, *a, **k))
    cfg = get_config("tiny")
    model = CLIP(cfg)
    images = mx.random.normal((3, cfg.vision_config.image_size, cfg.vision_config.image_size, 3))
    mx.eval(model.vision_model(images))
    assert seen[:6] == [2] * 6, seen


def test_a_block_on_a_batch_equals_its_modules_composed():
    """EncoderLayer on (B, L, D) against x + attn(ln1(x)), then + fc2(act(fc1(ln2(x)))) composed from its own modules
    on the same array (Attention's own (B, L, D) call): equal to float rounding, with a causal mask."""
    cfg = get_config("tiny")
    layer = CLIP(cfg).text_model.encoder.layers[0]
    x = mx.random.normal((2, 5, cfg.text_config.hidden_size), key=mx.random.key(1))
    h = x + layer.self_attn(layer.layer_norm1(x), "causal")
    want = h + layer.mlp(layer.layer_norm2(h))
    np.testing.assert_allclose(np.array(layer(x, "causal")), np.array(want), rtol=1e-5, atol=1e-5)
