"""The dense layer's product (mlx_clip/linear.py): both orders give x @ W.T + b and its gradients (numpy reference),
and the turned-round order is chosen only where it was measured to pay (few rows, CPU, MKL on every core)."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_clip import cpu_streams, linear


def _mkl_on_every_core() -> bool:
    # where the turned-round order applies at all: a CPU of several cores (a GPU's GEMMs are not MKL's)
    return cpu_streams.on_cpu() and cpu_streams.cores() > 1


@pytest.fixture(autouse=True)
def one_request_at_a_time():
    """Outside batch-parallel mode, whatever an earlier test's workload left switched on (a bench workload sets the
    mode before each run and leaves it): these tests are about that mode's orders."""
    with cpu_streams.batch_parallel_mode(False):
        yield


@pytest.fixture(params=["turned", "plain", "plain-autodiff"])
def order(request, monkeypatch):
    monkeypatch.setattr(linear, "FEW_ROWS", 10**9 if request.param == "turned" else 0)
    monkeypatch.setattr(linear, "ROW_MAJOR_GRADS", request.param != "plain-autodiff")
    return request.param.split("-")[0]


@pytest.mark.parametrize("shape", [(5, 12), (2, 7, 12), (1, 1, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_product_and_gradients_match_numpy(order, shape, bias):
    rng = np.random.default_rng(len(shape) + bias)
    x, w = rng.standard_normal(shape), rng.standard_normal((9, 12))
    b = rng.standard_normal(9) if bias else None
    g = rng.standard_normal((*shape[:-1], 9))  # cotangent of the output
    assert linear._turn_round(mx.zeros(shape), mx.zeros((9, 12))) == (order == "turned" and _mkl_on_every_core())

    def f(x, w, *b):
        return (linear.product(x, w, *b) * mx.array(g, mx.float32)).sum()

    args = [mx.array(a, mx.float32) for a in (x, w, b) if a is not None]
    out = linear.product(*args)
    grads = mx.grad(f, argnums=list(range(len(args))))(*args)
    ref = x @ w.T + (b if bias else 0)
    rows_x, rows_g = x.reshape(-1, 12), g.reshape(-1, 9)
    ref_grads = [g @ w, rows_g.T @ rows_x] + ([rows_g.sum(axis=0)] if bias else [])
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


def test_linear_module_is_an_nn_linear_with_the_same_parameters(order):
    layer = linear.Linear(12, 9)
    plain = nn.Linear(12, 9)
    plain.update(layer.parameters())
    x = mx.random.normal((3, 4, 12), key=mx.random.key(0))
    assert isinstance(layer, nn.Linear) and set(layer.parameters()) == {"weight", "bias"}
    np.testing.assert_allclose(np.array(layer(x)), np.array(plain(x)), rtol=1e-5, atol=1e-6)


def test_turned_round_only_for_few_rows_outside_batch_parallel_mode():
    w = mx.zeros((64, 32))
    few, many = mx.zeros((1, linear.FEW_ROWS, 32)), mx.zeros((1, linear.FEW_ROWS + 1, 32))
    multi_core = _mkl_on_every_core()
    assert linear._turn_round(few, w) == multi_core
    assert not linear._turn_round(many, w)
    with cpu_streams.batch_parallel_mode(True) as on:  # MKL at one thread per call: both orders run alike
        assert linear._turn_round(few, w) == (multi_core and not on)


def _row_major(a: mx.array) -> bool:
    # the buffer's strides as numpy would read them: a transposed view has the strides swapped
    return memoryview(a).strides == np.zeros(a.shape, np.float32).strides


@pytest.mark.skipif(not cpu_streams.on_cpu(), reason="the row-major weight gradient is the CPU's backward")
@pytest.mark.parametrize("on", [True, False])
def test_weight_gradient_comes_row_major_like_the_weight(monkeypatch, on):
    monkeypatch.setattr(linear, "FEW_ROWS", 0)
    monkeypatch.setattr(linear, "ROW_MAJOR_GRADS", on)
    x, w, b = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(2, 40, 24), (48, 24), (48,)]))
    dw = mx.grad(lambda w: (linear.product(x, w, b) ** 2).sum())(w)
    mx.eval(dw)
    # autodiff's (x^T g)^T is a transposed view; every later pass (clip norm, AdamW) would read it column by column
    assert _row_major(dw) == on


@pytest.mark.gpu
@pytest.mark.skipif(cpu_streams.on_cpu(), reason="the switch for a GPU's weight-gradient layout")
@pytest.mark.parametrize("rowmajor,copied", [(True, False), (False, False), (False, True)])
def test_gpu_weight_gradient_layout_switch_keeps_the_numbers(monkeypatch, rowmajor, copied):
    monkeypatch.setattr(linear, "ROW_MAJOR_GRADS_ON_GPU", rowmajor)
    monkeypatch.setattr(linear, "CONTIGUOUS_GRADS_ON_GPU", copied)
    rng = np.random.default_rng(3)
    x, w, b, g = rng.standard_normal((2, 40, 24)), rng.standard_normal((48, 24)), rng.standard_normal(48), \
        rng.standard_normal((2, 40, 48))
    f = lambda x, w, b: (linear.product(x, w, b) * mx.array(g, mx.float32)).sum()  # noqa: E731
    dx, dw, db = mx.grad(f, argnums=[0, 1, 2])(*(mx.array(a, mx.float32) for a in (x, w, b)))
    mx.eval(dx, dw, db)
    rows_x, rows_g = x.reshape(-1, 24), g.reshape(-1, 48)
    for got, want in zip((dx, dw, db), (g @ w, rows_g.T @ rows_x, rows_g.sum(axis=0))):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)
    assert _row_major(dw) == (rowmajor or copied)


@pytest.mark.parametrize("has_bias", [True, False])
def test_copied_weight_gradient_is_autodiffs_in_the_weights_layout(has_bias):
    """_dense with `copied` (MLXCLIP_GPU_CONTIGUOUS_GRADS's backward; its function runs on any device): autodiff's
    (xᵀ g)ᵀ made row-contiguous, the numbers unchanged."""
    rng = np.random.default_rng(5)
    x, w, b, g = rng.standard_normal((2, 30, 16)), rng.standard_normal((40, 16)), rng.standard_normal(40), \
        rng.standard_normal((2, 30, 40))
    args = [mx.array(a, mx.float32) for a in ((x, w, b) if has_bias else (x, w))]
    grads = {}
    for copied in (False, True):
        dense = linear._dense(mx.default_stream(mx.default_device()), has_bias, False, copied)
        _, grads[copied] = mx.vjp(dense, args, [mx.array(g, mx.float32)])
        mx.eval(grads[copied])
    assert not _row_major(grads[False][1]) and _row_major(grads[True][1])
    for a, c in zip(grads[False], grads[True]):
        assert np.array_equal(np.array(a), np.array(c))
    np.testing.assert_allclose(np.array(grads[True][1]), g.reshape(-1, 40).T @ x.reshape(-1, 16), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not cpu_streams.on_cpu(), reason="the row-major weight gradient is the CPU's backward")
def test_every_gradient_of_a_batch_parallel_step_is_row_major():
    from mlx.utils import tree_flatten

    from mlx_clip.config import get_config
    from mlx_clip.model import CLIP, init_weights
    from mlx_clip.train.step import make_loss_fn

    model = init_weights(CLIP(get_config("tiny")), 0)
    images = mx.random.normal((4, 32, 32, 3), key=mx.random.key(1))
    ids = mx.random.randint(1, 100, (4, 12), key=mx.random.key(2))
    with cpu_streams.batch_parallel_mode(True):
        _, grads = nn.value_and_grad(model, make_loss_fn("clip"))(model, images, ids, mx.arange(4))
        mx.eval(grads)
    strided = [name for name, g in tree_flatten(grads) if not _row_major(g)]
    assert not strided, strided


def test_a_frozen_weight_costs_no_gradient_product():
    # The hand-written backward returns dW for every call; MLX evaluates only what is asked for, so the gradient of
    # the input alone is one product (g @ W), as with autodiff: a LoRA step runs no GEMM for the frozen base weight.
    import io

    x, w, b = (mx.random.normal(s, key=mx.random.key(i)) for i, s in enumerate([(40, 24), (48, 24), (48,)]))
    dx = mx.grad(lambda x: (linear.product(x, w, b) * 2).sum())(x)
    graph = io.StringIO()
    mx.export_to_dot(graph, dx)
    assert graph.getvalue().count('"Matmul"') + graph.getvalue().count('"AddMM"') == 1


@pytest.mark.parametrize("row_major", [True, False])
def test_input_gradient_from_the_rows_without_flattening(row_major):
    """The hand-written backward computes dx from the cotangent's rows, which it makes for dW anyway, and shapes it
    back with one reshape: not `cotangent @ W` on (B, L, N), which MLX flattens and unflattens (two graph nodes a
    dense layer; a host-bound GPU step pays per node). Same numbers as MLX's autodiff."""
    from graph_util import primitives

    x = mx.random.normal((3, 5, 8), key=mx.random.key(0))
    weight, bias = mx.random.normal((6, 8), key=mx.random.key(1)), mx.random.normal((6,), key=mx.random.key(2))
    cot = mx.random.normal((3, 5, 6), key=mx.random.key(3))
    dense = linear._dense(mx.cpu, True, row_major)
    mx.eval(x, weight, bias, cot)
    _, grads = mx.vjp(lambda *p: [dense(*p)], [x, weight, bias], [cot])
    names = primitives(grads[0])  # before evaluation: dx's graph from the evaluated cotangent and weight
    assert "Matmul" in names and not {"Flatten", "Unflatten"} & set(names), names
    _, want = mx.vjp(lambda *p: [linear._plain(*p)], [x, weight, bias], [cot])
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)
