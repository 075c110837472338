"""mlx_clip.gpu_reduce (the gradients' column sums and the LayerNorm backward as CUDA kernels) against float64 numpy:
the sums, the LayerNorm's dx / gain / bias gradients, and the dense layer's and MLP block's gradients through them.
The kernels' tests need a CUDA device (`-m gpu`); the fallback (MLX's ops everywhere else) is tested here on any."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from mlx_clip import gpu_reduce, layer_norm, linear

cuda = pytest.mark.skipif(not mx.cuda.is_available(), reason="the reduction kernels are CUDA kernels")


def _values(shape, dtype, seed):
    """Random values exactly representable in `dtype`, as (mx array, float64 numpy copy)."""
    a = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)
    return a, np.array(a.astype(mx.float32)).astype(np.float64)


def _rel(got: mx.array, want: np.ndarray) -> float:
    return float(np.linalg.norm(np.array(got.astype(mx.float32)).astype(np.float64) - want) / np.linalg.norm(want))


def _layer_norm_grads(x, w, g, eps):
    """float64 (dx, dw, db) of <g, LayerNorm(x) w + b> over the last axis."""
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    gw = g * w
    dx = rstd * (gw - gw.mean(-1, keepdims=True) - xhat * (gw * xhat).mean(-1, keepdims=True))
    return dx, (g * xhat).sum(0), g.sum(0)


def test_column_sum_falls_back_to_mlx_off_cuda():
    x, ref = _values((3, 40, 24), mx.float32, 0)
    with mx.stream(mx.cpu):
        assert not gpu_reduce.column_sum_fits(120, 24, mx.float32)
        assert _rel(gpu_reduce.column_sum(x), ref.sum((0, 1))) <= 1e-6


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((256, 197, 768), mx.bfloat16), ((2048, 520), mx.float32),
                                         ((8192, 3072), mx.bfloat16), ((1500, 4096), mx.float16),
                                         ((1024, 8), mx.float32)])
@pytest.mark.parametrize("finish", [False, True], ids=["mlx-finish", "kernel-finish"])
def test_column_sum_matches_float64(monkeypatch, shape, dtype, finish):
    monkeypatch.setattr(gpu_reduce, "FINISH_KERNEL", finish)  # the partials summed by MLX, or by our FINISH kernel
    x, ref = _values(shape, dtype, 1)
    rows = x.size // shape[-1]
    assert gpu_reduce.column_sum_fits(rows, shape[-1], dtype)
    got = gpu_reduce.column_sum(x)
    assert got.dtype == dtype and got.shape == (shape[-1],)
    want = ref.reshape(rows, -1).sum(0)
    # fp32 sums; the result rounded to the dtype (bf16: 2^-9 relative)
    assert _rel(got, want) <= (1e-6 if dtype == mx.float32 else 4e-3)
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(gpu_reduce.column_sum(x).astype(mx.float32)))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((64, 197, 768), mx.bfloat16), ((1100, 520), mx.float32),
                                         ((2048, 1024), mx.float16), ((256, 32, 512), mx.float32)])
@pytest.mark.parametrize("finish", [False, True], ids=["mlx-finish", "kernel-finish"])
def test_layer_norm_backward_matches_float64(monkeypatch, shape, dtype, finish):
    monkeypatch.setattr(gpu_reduce, "FINISH_KERNEL", finish)
    eps = 1e-5
    (x, xr), (w, wr), (b, _), (g, gr) = (_values(s, dtype, i) for i, s in
                                         enumerate([shape, shape[-1:], shape[-1:], shape]))
    x = (x * 3 + 1).astype(dtype)  # a mean and a spread away from 0 and 1
    xr = np.array(x.astype(mx.float32)).astype(np.float64)
    assert gpu_reduce.layer_norm_applies(x, w)
    _, (dx, dw, db) = mx.vjp(lambda *p: layer_norm.layer_norm(*p, eps), [x, w, b], [g])
    want_dx, want_dw, want_db = _layer_norm_grads(xr, wr, gr, eps)
    tol = 1e-4 if dtype == mx.float32 else 1e-2
    assert dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    assert _rel(dx.reshape(-1, shape[-1]), want_dx) <= tol
    assert _rel(dw, want_dw) <= tol and _rel(db, want_db) <= tol
    # dx as MLX's own LayerNorm backward gives it; the sums at least as close to float64 as MLX's (its bf16 column
    # reductions are off by ~2.5% here, ours by < 1%: measured on an H200)
    _, (mlx_dx, mlx_dw, mlx_db) = mx.vjp(lambda *p: mx.fast.layer_norm(*p, eps), [x, w, b], [g])
    assert _rel(dx, np.array(mlx_dx.astype(mx.float32)).astype(np.float64)) <= tol
    for ours, theirs, want in ((dw, mlx_dw, want_dw), (db, mlx_db, want_db)):
        assert _rel(ours, want) <= _rel(theirs, want) + tol / 10


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,dtype", [(512, 768, mx.bfloat16), (37, 1000, mx.float32), (1, 8, mx.float16),
                                              (300, 2 * 520, mx.float32)])
def test_finish_kernel_matches_float64(monkeypatch, rows, width, dtype):
    """FINISH alone: any row count and width (a partly used last block of 32 columns), rounded once to the dtype, the
    same bits on every run."""
    monkeypatch.setattr(gpu_reduce, "FINISH_KERNEL", True)
    partial, ref = _values((rows, width), mx.float32, 5)
    got = gpu_reduce.finish(partial, dtype)
    assert got.dtype == dtype and got.shape == (width,)
    want = ref.sum(0)
    err = np.abs(np.array(got.astype(mx.float32)).astype(np.float64) - want)
    ulp = {mx.float32: 2.0**-23, mx.bfloat16: 2.0**-8, mx.float16: 2.0**-10}[dtype]
    # fp32 adds over the rows (|terms| summed times rows · 2^-24), then one rounding to the dtype
    bound = ulp * np.abs(want) + rows * 2.0**-24 * np.abs(ref).sum(0)
    assert np.all(err <= bound)
    again = gpu_reduce.finish(partial, dtype)
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(again.astype(mx.float32)))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((64, 197, 768), mx.bfloat16), ((1100, 520), mx.float32),
                                         ((2048, 1024), mx.float16), ((256, 32, 512), mx.bfloat16)])
def test_layer_norm_forward_matches_float64(monkeypatch, shape, dtype):
    """MLXCLIP_GPU_LAYER_NORM_FORWARD's kernel: LayerNorm(x) w + b within the dtype's rounding of float64, and no
    further from it than mx.fast.layer_norm."""
    eps = 1e-5
    (x, _), (w, wr), (b, br) = (_values(s, dtype, i) for i, s in enumerate([shape, shape[-1:], shape[-1:]]))
    x = (x * 3 + 1).astype(dtype)
    xr = np.array(x.astype(mx.float32)).astype(np.float64).reshape(-1, shape[-1])
    monkeypatch.setattr(gpu_reduce, "LN_FORWARD", True)
    assert gpu_reduce.layer_norm_applies(x, w)
    calls = []
    real = gpu_reduce.layer_norm_forward
    monkeypatch.setattr(gpu_reduce, "layer_norm_forward", lambda *a: calls.append(1) or real(*a))
    got = layer_norm.layer_norm(x, w, b, eps)
    assert calls == [1] and got.dtype == dtype and got.shape == shape
    mean = xr.mean(-1, keepdims=True)
    want = (xr - mean) / np.sqrt(((xr - mean) ** 2).mean(-1, keepdims=True) + eps) * wr + br
    tol = 1e-6 if dtype == mx.float32 else 4e-3
    assert _rel(got.reshape(-1, shape[-1]), want) <= tol
    mlx = mx.fast.layer_norm(x, w, b, eps).reshape(-1, shape[-1])
    assert _rel(got.reshape(-1, shape[-1]), want) <= _rel(mlx, want) + tol / 10


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_dense_layer_bias_gradient_by_the_kernel(monkeypatch, dtype):
    """linear.product's backward with the column-sum kernel gives MLX autodiff's gradients."""
    (x, _), (weight, _), (bias, _), (g, gr) = (_values(s, dtype, i + 10) for i, s in
                                               enumerate([(64, 50, 768), (3072, 768), (3072,), (64, 50, 3072)]))
    calls = []
    real = gpu_reduce.column_sum
    monkeypatch.setattr(gpu_reduce, "column_sum", lambda a: calls.append(a.shape) or real(a))
    _, ours = mx.vjp(linear.product, [x, weight, bias], [g])
    mx.eval(ours)
    assert calls == [(3200, 3072)]
    _, autodiff = mx.vjp(lambda x, w, b: mx.addmm(b, x, w.T), [x, weight, bias], [g])
    want_db = gr.reshape(-1, 3072).sum(0)
    assert _rel(ours[2], want_db) <= (1e-6 if dtype == mx.float32 else 4e-3)
    # the bias gradient at least as close to float64 as autodiff's (MLX's bf16 column sum is off by ~1% here)
    assert _rel(ours[2], want_db) <= _rel(autodiff[2], want_db) + 1e-6
    for a, b in zip(ours[:2], autodiff[:2]):
        assert _rel(a, np.array(b.astype(mx.float32)).astype(np.float64)) <= (1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("shape", [(12, 8), (3, 4, 8)])
def test_column_sum_takes_a_matrix_as_it_is(shape):
    """A (rows, width) input goes to the sum (or the kernel) without a Reshape node to its own shape (MLX makes one
    even then; the dense and MLP backward hand in rows, ~140 bias gradients a ViT step, whose GPU step pays per
    node); a (B, L, D) one is reshaped once. Either way Σ over the rows, as numpy sums."""
    from graph_util import primitives

    x = mx.random.normal(shape, key=mx.random.key(0))
    mx.eval(x)
    total = gpu_reduce.column_sum(x)
    names = primitives(total)
    assert names.count("Reshape") == (len(shape) != 2), names
    np.testing.assert_allclose(np.array(total), np.array(x).reshape(-1, 8).sum(axis=0), rtol=1e-5, atol=1e-6)
