"""mlx_clip.gpu_attention (the fused short-sequence attention kernels, CUDA only) against float64 torch autograd:
outputs and q/k/v gradients at CLIP's shapes, masked and not, and through the model's attention layer."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip import fastmath, fused_qkv, gpu_attention

pytestmark = pytest.mark.gpu
if not mx.cuda.is_available():
    pytest.skip("the fused attention kernels are CUDA kernels", allow_module_level=True)


def _reference(q, k, v, w, heads, causal):
    """Value and gradients of sum(attention(q, k, v) * w) in float64 torch, (B, L, heads * 64) layout."""
    torch = pytest.importorskip("torch")
    batch, length, width = q.shape
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    split = lambda t: t.reshape(batch, length, heads, -1).transpose(1, 2)
    scores = split(tq) @ split(tk).transpose(-1, -2) / 8
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(scores, -1) @ split(tv)).transpose(1, 2).reshape(batch, length, width)
    (out * torch.tensor(w, dtype=torch.float64)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in (tq, tk, tv)]


def _inputs(length, heads, seed):
    """q, k, v (values exact in bf16) and the loss weights w, (3, length, heads * 64) float32."""
    rng = np.random.default_rng(seed)
    q, k, v, w = (rng.standard_normal((3, length, heads * 64)).astype(np.float32) for _ in range(4))
    q, k, v = (np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32)) for a in (q, k, v))
    return q, k, v, w


def _rel(got, want) -> float:
    return float(np.linalg.norm(np.array(got.astype(mx.float32)) - want) / np.linalg.norm(want))


# <= 64 tokens: the one-block kernels; above: the tiled ones (ViT-B/16's 197, untrimmed text's 77 causal, one past a
# block, a whole number of 64-row blocks, the largest)
@pytest.mark.parametrize("length,heads,causal", [(50, 12, False), (32, 8, True), (17, 2, True), (64, 3, False),
                                                 (7, 2, False), (197, 12, False), (77, 8, True), (65, 2, True),
                                                 (128, 3, False), (130, 3, True), (256, 2, False),
                                                 (257, 12, False), (320, 2, True)])
def test_fused_matches_float64_values_and_gradients(length, heads, causal):
    q, k, v, w = _inputs(length, heads, seed=length)
    mq, mk, mv = (mx.array(a).astype(mx.bfloat16) for a in (q, k, v))
    mask = "causal" if causal else None
    assert gpu_attention.supported(mq, heads, 0.125, mask)
    attend = gpu_attention.fused(heads, causal)

    def loss(q, k, v):
        return (attend(q, k, v).astype(mx.float32) * mx.array(w)).sum()

    want, want_grads = _reference(q, k, v, w, heads, causal)
    assert _rel(attend(mq, mk, mv), want) <= 1e-2  # bf16 output; bf16 probabilities into p·v as flash attention
    for got, ref in zip(mx.grad(loss, argnums=(0, 1, 2))(mq, mk, mv), want_grads):
        assert _rel(got, ref) <= 2e-2  # bf16 gradients through bf16 ds


# The tiled kernels' other shapes (mlx_clip/gpu_attention.py), within the same bounds, each as it ran on the H200:
# the forward with 32 rows a warp in 4-warp blocks; dq with 32 rows a warp, 16-key steps, 4 warps (sessions 13-19),
# with 32-key steps, with 8 warps, and with 16 rows a warp, 16-key steps, 4 warps; dk/dv in 4-warp blocks, with 32 key
# rows a warp (a partly filled last block, causal masks across a warp's two key tiles), with ldmatrix for the
# row-major operands too (MLXCLIP_GPU_LDMATRIX=2), and with 32-query steps (a step past the last tile, causal tiles
# half masked)
_DQ32 = {"DQ_ROWS": 32, "DQ_STEP": 16, "DQ_WARPS": 4}
SWITCHES = {"fwd32warps4": {"FWD_ROWS": 32, "FWD_WARPS": 4},
            "dq32": _DQ32, "dq32step32": _DQ32 | {"DQ_STEP": 32}, "dq32warps8": _DQ32 | {"DQ_WARPS": 8},
            "dq16step16": {"DQ_ROWS": 16, "DQ_STEP": 16, "DQ_WARPS": 4},
            "dkdvwarps4": {"DKDV_WARPS": 4}, "dkdv32": {"DKDV_ROWS": 32, "DKDV_WARPS": 4},
            "ldmatrix2": {"LDMATRIX": 2, "DKDV_ROWS": 32, "DKDV_WARPS": 4},
            "dkdvstep32": {"DKDV_STEP": 32, "LDMATRIX": 2, "DKDV_WARPS": 4}}


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("length,heads,causal", [(197, 12, False), (77, 8, True), (65, 2, True), (130, 3, True),
                                                 (320, 2, False)])
def test_kernel_switches_match_float64(monkeypatch, switches, length, heads, causal):
    for name, value in SWITCHES[switches].items():
        monkeypatch.setattr(gpu_attention, name, value)
    q, k, v, w = _inputs(length, heads, seed=length + 1)
    mq, mk, mv = (mx.array(a).astype(mx.bfloat16) for a in (q, k, v))
    attend = gpu_attention.fused(heads, causal)
    want, want_grads = _reference(q, k, v, w, heads, causal)
    assert _rel(attend(mq, mk, mv), want) <= 1e-2
    grads = mx.grad(lambda q, k, v: (attend(q, k, v).astype(mx.float32) * mx.array(w)).sum(), argnums=(0, 1, 2))(
        mq, mk, mv)
    for got, ref in zip(grads, want_grads):
        assert _rel(got, ref) <= 2e-2


def test_supported_lengths():
    x = lambda length: mx.zeros((2, length, 128), dtype=mx.bfloat16)
    assert gpu_attention.supported(x(320), 2, 0.125, None) and gpu_attention.supported(x(1), 2, 0.125, "causal")
    assert not gpu_attention.supported(x(321), 2, 0.125, None)  # beyond the tiled kernels: sdpa
    assert not gpu_attention.supported(x(197).astype(mx.float32), 2, 0.125, None)
    assert not gpu_attention.supported(x(197), 2, 0.125, mx.zeros((197, 197)))


@pytest.mark.parametrize("arch,tokens", [("ViT-B-32", 50), ("ViT-B-16", 197)])
def test_model_attention_takes_the_fused_kernel_and_agrees_with_sdpa(monkeypatch, arch, tokens):
    """value_and_grad of the same layer with MLXCLIP_GPU_ATTENTION=fused and =sdpa gives the same numbers."""
    from mlx_clip.config import get_config
    from mlx_clip.io import cast
    from mlx_clip.model import EncoderLayer

    layer = cast(EncoderLayer(get_config(arch).vision_config), "bfloat16")
    x = mx.random.normal((4, tokens, 768), key=mx.random.key(1)).astype(mx.bfloat16)
    mx.eval(layer.parameters(), x)
    calls = []
    real = gpu_attention.fused
    monkeypatch.setattr(gpu_attention, "fused", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(fused_qkv, "ENABLED", False)  # q, k, v apart (one product: the test below)

    params = layer.trainable_parameters()

    def loss(params, x):
        layer.update(params)
        return layer(x).astype(mx.float32).square().mean()

    def run(mode):
        monkeypatch.setattr(fastmath, "GPU_ATTENTION", mode)
        out = mx.value_and_grad(loss)(params, x)
        mx.eval(out)
        layer.update(params)  # the traced call left its own arrays in the layer
        return out

    fused_value, fused_grads = run("fused")
    assert calls == [(12, False)]
    sdpa_value, sdpa_grads = run("sdpa")
    assert abs(fused_value.item() - sdpa_value.item()) <= 1e-2 * abs(sdpa_value.item())
    for (name, a), (_, b) in zip(tree_flatten(fused_grads), tree_flatten(sdpa_grads)):
        if name.endswith("k_proj.bias"):  # softmax ignores a per-query constant: this gradient is 0 up to rounding
            assert float(mx.abs(a).max()) <= 1e-5 and float(mx.abs(b).max()) <= 1e-5
            continue
        assert _rel(a, np.array(b.astype(mx.float32))) <= 3e-2, name


@pytest.mark.parametrize("length,heads,causal", [(50, 12, False), (32, 8, True), (17, 2, True), (64, 3, False),
                                                 (7, 2, False)])
def test_joint_kernels_read_q_k_v_from_one_array(length, heads, causal):
    """gpu_attention.fused_qkv of [q | k | v] equals float64 attention of q, k, v; its gradient is [dq | dk | dv]."""
    q, k, v, w = _inputs(length, heads, seed=length + 2)
    qkv = mx.array(np.concatenate([q, k, v], axis=-1)).astype(mx.bfloat16)
    mask = "causal" if causal else None
    assert gpu_attention.supported_joint(heads * 64, length, mx.bfloat16, heads, 0.125, mask)
    attend = gpu_attention.fused_qkv(heads, causal)
    want, want_grads = _reference(q, k, v, w, heads, causal)
    assert _rel(attend(qkv), want) <= 1e-2
    grad = mx.grad(lambda t: (attend(t).astype(mx.float32) * mx.array(w)).sum())(qkv)
    assert grad.shape == qkv.shape
    for got, ref in zip(mx.split(grad, 3, axis=-1), want_grads):
        assert _rel(got, ref) <= 2e-2


def test_joint_kernels_take_only_short_sequences():
    assert gpu_attention.supported_joint(768, 64, mx.bfloat16, 12, 0.125, "causal")
    assert not gpu_attention.supported_joint(768, 65, mx.bfloat16, 12, 0.125, None)  # the tiled kernels: apart
    assert not gpu_attention.supported_joint(768, 50, mx.float32, 12, 0.125, None)


@pytest.mark.parametrize("arch,tower,tokens,mask", [("ViT-B-32", "vision_config", 50, None),
                                                    ("ViT-B-32", "text_config", 30, "causal")])
def test_model_layer_with_one_qkv_product_agrees_with_three(monkeypatch, arch, tower, tokens, mask):
    """value_and_grad of one encoder block with q, k, v as one product (mlx_clip.fused_qkv) and as three: the same
    numbers, every parameter's gradient included."""
    from mlx_clip.config import get_config
    from mlx_clip.io import cast
    from mlx_clip.model import EncoderLayer

    cfg = getattr(get_config(arch), tower)
    layer = cast(EncoderLayer(cfg), "bfloat16")
    x = mx.random.normal((4 * tokens, cfg.hidden_size), key=mx.random.key(2)).astype(mx.bfloat16)
    mx.eval(layer.parameters(), x)
    calls = []
    real = gpu_attention.fused_qkv
    monkeypatch.setattr(gpu_attention, "fused_qkv", lambda *a: calls.append(a) or real(*a))
    params = layer.trainable_parameters()

    def loss(params, x):
        layer.update(params)
        return layer.rows(x, (4, tokens), mask).astype(mx.float32).square().mean()

    def run(enabled):
        monkeypatch.setattr(fused_qkv, "ENABLED", enabled)
        out = mx.value_and_grad(loss)(params, x)
        mx.eval(out)
        layer.update(params)
        return out

    joint_value, joint_grads = run(True)
    assert calls == [(cfg.num_attention_heads, mask == "causal")]
    value, grads = run(False)
    assert len(calls) == 1
    assert abs(joint_value.item() - value.item()) <= 1e-2 * abs(value.item())
    for (name, a), (_, b) in zip(tree_flatten(joint_grads), tree_flatten(grads)):
        if name.endswith("k_proj.bias"):  # softmax ignores a per-query constant: this gradient is 0 up to rounding
            assert float(mx.abs(a).max()) <= 1e-5 and float(mx.abs(b).max()) <= 1e-5
            continue
        assert a.shape == b.shape and _rel(a, np.array(b.astype(mx.float32))) <= 3e-2, name
