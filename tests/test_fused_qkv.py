"""mlx_clip.fused_qkv's wiring, on any device: with the CUDA kernels replaced by attention of q, k, v split off the
joint product, an encoder block's value and every parameter's gradient equal the three-product path's (fp32); and the
path stays off where it does not apply. The kernels themselves are tested on the card (tests/test_gpu_attention.py)."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip import fastmath, fused_qkv, gpu_attention
from mlx_clip.config import get_config
from mlx_clip.model import EncoderLayer


def _split_attention(heads: int, causal: bool):
    """What the joint kernels compute, from MLX ops: attention of the three column blocks of qkv."""
    def attend(qkv):
        q, k, v = (fastmath.split_heads(t, heads) for t in mx.split(qkv, 3, axis=-1))
        scale = q.shape[-1] ** -0.5  # the kernels' 1/8 at their head width of 64
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
        return fastmath.merge_heads(out)
    return attend


@pytest.fixture
def joint_anywhere(monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_attention, "supported_joint", lambda *a: True)
    monkeypatch.setattr(gpu_attention, "fused_qkv", lambda *a: calls.append(a) or _split_attention(*a))
    monkeypatch.setattr(fastmath, "GPU_ATTENTION", "fused")
    return calls


def _value_and_grads(layer, x, lengths, mask):
    params = layer.trainable_parameters()

    def loss(params):
        layer.update(params)
        return layer.rows(x, lengths, mask).square().mean()

    out = mx.value_and_grad(loss)(params)
    mx.eval(out)
    layer.update(params)  # the traced call left its own arrays in the layer
    return out


@pytest.mark.parametrize("tower,tokens,mask", [("vision_config", 50, None), ("text_config", 12, "causal")])
def test_one_product_equals_three(monkeypatch, joint_anywhere, tower, tokens, mask):
    cfg = getattr(get_config("tiny"), tower)
    layer = EncoderLayer(cfg)
    x = mx.random.normal((3 * tokens, cfg.hidden_size), key=mx.random.key(4))
    mx.eval(layer.parameters(), x)
    joint_value, joint_grads = _value_and_grads(layer, x, (3, tokens), mask)
    assert joint_anywhere == [(cfg.num_attention_heads, mask == "causal")]
    monkeypatch.setattr(fused_qkv, "ENABLED", False)
    value, grads = _value_and_grads(layer, x, (3, tokens), mask)
    assert len(joint_anywhere) == 1
    np.testing.assert_allclose(joint_value.item(), value.item(), rtol=1e-5)
    for (name, a), (other, b) in zip(tree_flatten(joint_grads), tree_flatten(grads)):
        assert name == other and a.shape == b.shape
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6, err_msg=name)


def test_adapted_or_chunked_layers_keep_three_products(joint_anywhere):
    cfg = get_config("tiny").vision_config
    layer = EncoderLayer(cfg)
    attn = layer.self_attn
    assert fused_qkv.applies(attn, mx.float32, (2, 50), None)
    attn.chunk = 16  # memory-saving attention in chunks reads q, k, v apart
    assert not fused_qkv.applies(attn, mx.float32, (2, 50), None)
    attn.chunk = 0
    attn.v_proj = nn.QuantizedLinear.from_linear(nn.Linear(cfg.hidden_size, cfg.hidden_size))  # not a plain Linear
    assert not fused_qkv.applies(attn, mx.float32, (2, 50), None)


def test_off_the_cuda_kernels_nothing_changes():
    """Without the joint kernels (the CPU, Metal, fp32, > 64 tokens) `applies` is false: the three products run."""
    attn = EncoderLayer(get_config("tiny").vision_config).self_attn
    assert not gpu_attention.supported_joint(attn.q_proj.weight.shape[0], 50, mx.float32, attn.num_heads, attn.scale,
                                             None)
    assert not fused_qkv.applies(attn, mx.float32, (2, 50), None)


def test_joint_attention_hands_its_gradient_back_as_one_array(monkeypatch):
    """gpu_attention.fused_qkv's forward and hand-written backward, with the two kernel launches done by MLX ops: the
    gradient of the (B, L, 3D) input is autodiff's of attention over its three column blocks."""
    heads, causal = 2, True
    reference = _split_attention(heads, causal)

    def launch(kernel, inputs, heads_, causal_, outputs, width=0, **_):
        assert (heads_, causal_, outputs) == (heads, causal, 1)
        if kernel == "forward":
            assert width == inputs[0].shape[-1] // 3
            return [reference(inputs[0])]
        qkv, dout = inputs
        assert kernel == "backward" and dout.shape[-1] == qkv.shape[-1] // 3
        return [mx.vjp(reference, [qkv], [dout])[1][0]]

    monkeypatch.setattr(gpu_attention, "_joint_kernels", lambda: ("forward", "backward"))
    monkeypatch.setattr(gpu_attention, "_launch", launch)
    gpu_attention.fused_qkv.cache_clear()
    try:
        attend = gpu_attention.fused_qkv(heads, causal)
        qkv = mx.random.normal((3, 10, 3 * heads * 64), key=mx.random.key(5))
        w = mx.random.normal((3, 10, heads * 64), key=mx.random.key(6))
        got = mx.grad(lambda t: (attend(t) * w).sum())(qkv)
        want = mx.grad(lambda t: (reference(t) * w).sum())(qkv)
    finally:
        gpu_attention.fused_qkv.cache_clear()  # the next caller builds it with the real launches
    assert got.shape == qkv.shape
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
