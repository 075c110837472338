"""mlx_clip.fastmath against float64 numpy: values and hand-written gradients of GELU / QuickGELU, exp, softmax and
attention (with and without masks), in float32 and bfloat16, eager and inside mx.compile."""

import math

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip import fastmath, gpu_attention

_erf = np.vectorize(math.erf)
X = np.concatenate([np.linspace(-12, 12, 20001), [0.0, -0.0, 1e-30, -1e-30, 4.0, -4.0, 5.657, -5.657]]).astype(np.float32)


def _gelu(x):
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def _gelu_grad(x):
    return 0.5 * (1 + _erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _quick_gelu(x):
    return x * _sigmoid(1.702 * x)


def _quick_gelu_grad(x):
    s = _sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1 - s)


@pytest.mark.parametrize("fn,ref,ref_grad", [(fastmath.gelu, _gelu, _gelu_grad),
                                              (fastmath.quick_gelu, _quick_gelu, _quick_gelu_grad)])
@pytest.mark.parametrize("compiled", [False, True])
def test_activation_value_and_gradient(fn, ref, ref_grad, compiled):
    x64 = X.astype(np.float64)
    value = mx.compile(fn) if compiled else fn
    grad = mx.grad(lambda v: (fn(v) * mx.array(np.linspace(0.5, 2.0, X.size), mx.float32)).sum())
    grad = mx.compile(grad) if compiled else grad
    got, got_grad = np.array(value(mx.array(X))), np.array(grad(mx.array(X)))
    assert np.abs(got - ref(x64)).max() <= 3e-6
    assert np.abs(got_grad - ref_grad(x64) * np.linspace(0.5, 2.0, X.size)).max() <= 1e-5
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(got_grad))


def test_activation_keeps_half_dtype_and_computes_in_float32():
    x = mx.array(np.linspace(-6, 6, 1001), mx.bfloat16)
    out = fastmath.gelu(x)
    assert out.dtype == mx.bfloat16
    ref = _gelu(np.array(x.astype(mx.float32)).astype(np.float64))
    assert np.abs(np.array(out.astype(mx.float32)) - ref).max() <= 2 ** -7 * np.abs(ref).max()


def test_exp_relative_error_on_nonpositive_inputs():
    x = np.linspace(-80, 0, 100001).astype(np.float32)
    got = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - want) / want) <= 1e-6
    assert float(np.array(fastmath.exp(mx.array([-np.inf], mx.float32)))[0]) < 1e-37


def _softmax(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_value_and_gradient():
    rng = np.random.default_rng(0)
    s = (rng.standard_normal((3, 4, 7, 9)) * 5).astype(np.float32)
    w = rng.standard_normal(s.shape).astype(np.float32)
    got = np.array(fastmath.softmax(mx.array(s)))
    p = _softmax(s.astype(np.float64))
    np.testing.assert_allclose(got, p, rtol=2e-6, atol=1e-7)
    grad = np.array(mx.grad(lambda v: (fastmath.softmax(v) * mx.array(w)).sum())(mx.array(s)))
    want = p * (w - (w * p).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def _attention(q, k, v, scale, causal):
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = s + np.triu(np.full(s.shape[-2:], -np.inf), 1)
    return _softmax(s) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy_and_fused_kernel(causal):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 11, 8)).astype(np.float32) for _ in range(3))
    mask = "causal" if causal else None
    got = np.array(fastmath.attention(*map(mx.array, (q, k, v)), scale=8 ** -0.5, mask=mask))
    want = _attention(*(a.astype(np.float64) for a in (q, k, v)), 8 ** -0.5, causal)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-6
    fused = np.array(mx.fast.scaled_dot_product_attention(*map(mx.array, (q, k, v)), scale=8 ** -0.5, mask=mask))
    assert np.linalg.norm(got - fused) / np.linalg.norm(fused) <= 1e-6


def test_attention_gradients_match_fused_kernel():
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 2, 13, 8)).astype(np.float32)) for _ in range(3))
    w = mx.array(rng.standard_normal((2, 2, 13, 8)).astype(np.float32))

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v) * w).sum()

    ours = mx.grad(loss(lambda q, k, v: fastmath.attention(q, k, v, 0.3, "causal")), argnums=(0, 1, 2))(q, k, v)
    fused = mx.grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask="causal")),
                    argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, fused):
        a, b = np.array(a), np.array(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) <= 1e-5


@pytest.mark.parametrize("mode,length,causal,runs_at",
                         [("padded", 77, True, 128), ("padded", 70, False, 128), ("padded", 50, False, 50),
                          ("aligned", 77, True, 80), ("aligned", 197, False, 200), ("aligned", 64, False, 64)],
                         ids=["padded-77-causal", "padded-70", "padded-50-not-padded", "aligned-77-causal",
                              "aligned-197", "aligned-64-not-padded"])
def test_padded_sdpa_matches_numpy_values_and_gradients(monkeypatch, mode, length, causal, runs_at):
    """The opt-in GPU paths that pad the sequence and mask the padded keys (MLXCLIP_GPU_ATTENTION=padded: to a multiple
    of 128 for cuDNN's backward; =aligned: to a multiple of 8 for aligned GEMMs), run here through the same MLX op so
    the arithmetic is checked on any device: values and gradients against float64 numpy / torch."""
    monkeypatch.setattr(fastmath, "GPU_ATTENTION", mode)
    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw))
    rng = np.random.default_rng(3)
    q, k, v, w = (rng.standard_normal((2, 2, length, 8)).astype(np.float16) for _ in range(4))
    mask = "causal" if causal else None

    def loss(q, k, v):
        return (fastmath._gpu_attention(q, k, v, 0.35, mask).astype(mx.float32) * mx.array(w, mx.float32)).sum()

    out = np.array(fastmath._gpu_attention(*map(mx.array, (q, k, v)), 0.35, mask).astype(mx.float32))
    assert out.shape == (2, 2, length, 8) and calls[-1] == runs_at
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    want = _attention(q64, k64, v64, 0.35, causal)
    assert np.linalg.norm(out - want) / np.linalg.norm(want) <= 2e-3  # float16 inputs and output
    grads = mx.grad(loss, argnums=(0, 1, 2))(*map(mx.array, (q, k, v)))
    torch = pytest.importorskip("torch")  # float64 autograd of the same attention: the reference gradients
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q64, k64, v64))
    scores = tq @ tk.transpose(-1, -2) * 0.35
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    (torch.softmax(scores, -1) @ tv * torch.tensor(w, dtype=torch.float64)).sum().backward()
    for got, ref in zip(grads, (tq.grad, tk.grad, tv.grad)):
        got, ref = np.array(got.astype(mx.float32)), ref.numpy()
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 5e-3  # float16 gradients


def test_kernels_are_kept_off_gpus_without_bf16_tensor_cores():
    """V100 / T4 (compute capability 7.x) cannot run bf16 mma.sync: such devices take mx.fast's SDPA."""
    assert gpu_attention.capable({"compute_capability_major": 9, "compute_capability_minor": 0})  # H100 / H200
    assert gpu_attention.capable({"compute_capability_major": 8, "compute_capability_minor": 0})  # A100
    assert not gpu_attention.capable({"compute_capability_major": 7, "compute_capability_minor": 5})  # T4
    assert gpu_attention.capable({"architecture": "x86_64"})  # no such field reported: as before the check
