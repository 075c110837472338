"""mlx_clip.train.multi_tensor (CUDA only): the multi-tensor gradient sum of squares against float64 numpy, its AdamW
against a numpy AdamW (torch semantics: bias-corrected, decoupled decay, clip factor, skipped non-finite step), and
the compiled train step with the kernels against the same step on the per-parameter path."""

import mlx_clip  # noqa: F401  (BLAS preload before mlx.core)

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip.config import get_config
from mlx_clip.io import cast
from mlx_clip.model import CLIP, init_weights
from mlx_clip.train import multi_tensor
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train import step as step_module
from mlx_clip.train.step import make_loss_fn, make_step

pytestmark = pytest.mark.gpu
if not mx.cuda.is_available():
    pytest.skip("the multi-tensor kernels are CUDA kernels", allow_module_level=True)

# Sizes across tile edges (TILE = 4096), a scalar, and more arrays than one launch takes (64).
SIZES = [1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 50_000] + [33 * (i + 1) for i in range(70)]


def _arrays(seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(n)).astype(np.float32) for n in SIZES]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sum_of_squares_matches_float64(dtype):
    arrays = [mx.array(a).astype(dtype) for a in _arrays(0)]
    want = sum(float(np.sum(np.array(a.astype(mx.float32), dtype=np.float64) ** 2)) for a in arrays)
    got = multi_tensor.sum_of_squares(arrays).item()
    assert abs(got - want) / want < 1e-5


def _layouts(dtype) -> list[mx.array]:
    """Arrays as gradients come, none copied to row-major: row-major, transposed (column-major, as autodiff hands
    back x @ W.T's weight gradient), a 4-D permutation, a broadcast, slices, a scalar; more than 24, so several
    launches."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(12):
        w = mx.array(rng.standard_normal((33 + i, 4096 + 7 * i)).astype(np.float32)).astype(dtype)
        out += [w, w.T, w[:, ::3], w[1:]]
    cube = mx.array(rng.standard_normal((6, 5, 4, 3)).astype(np.float32)).astype(dtype)
    out += [cube.transpose(3, 1, 0, 2), mx.broadcast_to(mx.array([1.5, -2.0], dtype=dtype), (5000, 2)),
            mx.array(0.75, dtype=dtype)]
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_strided_sum_of_squares_reads_every_layout_in_place(dtype):
    arrays = _layouts(dtype)
    assert len(arrays) > 2 * multi_tensor.STRIDED_MAX_TENSORS
    want = sum(float(np.sum(np.array(a.astype(mx.float32), dtype=np.float64) ** 2)) for a in arrays)
    got = multi_tensor.sum_of_squares_strided(arrays).item()
    assert abs(got - want) / want < 1e-5


def _numpy_adamw(p, g, m, v, lr, step, scale, wd, gscale, finite, b1, b2, eps):
    if not finite:
        return p, m, v
    g = g.astype(np.float64) * gscale
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_t = lr * scale
    update = lr_t / (1 - b1**step) * m / (np.sqrt(v) / np.sqrt(1 - b2**step) + eps)
    return p * (1 - lr_t * wd) - update, m, v


@pytest.mark.parametrize("finite", [True, False])
def test_adamw_matches_numpy_over_steps(finite):
    betas, eps, lr, gscale = (0.9, 0.98), 1e-6, 1e-3, 0.5
    params = _arrays(1)
    hparams = [(1.0 if i % 3 else 0.25, 0.1 if i % 2 else 0.0) for i in range(len(params))]
    ms = [np.zeros_like(p, dtype=np.float64) for p in params]
    vs = [np.zeros_like(p, dtype=np.float64) for p in params]
    ref = [p.astype(np.float64) for p in params]
    got_p, got_m, got_v = [mx.array(p) for p in params], [mx.zeros(p.shape) for p in params], [mx.zeros(p.shape) for p in params]
    for step in (1, 2, 3):  # the first step reads zero moments; later ones read the kernel's own fp32 moments
        grads = _arrays(10 + step, scale=0.01)
        ok = finite or step != 2  # a non-finite step in the middle must leave everything as it was
        grads_mx = [mx.array(g) for g in grads]
        if not ok:
            grads_mx[3] = mx.full(grads_mx[3].shape, float("nan"))
        got_p, got_m, got_v = multi_tensor.adamw(
            got_p, grads_mx, got_m, got_v, hparams, mx.array(lr), mx.array(step, mx.uint64), mx.array(gscale),
            mx.array(ok), betas, eps)
        mx.eval(got_p, got_m, got_v)
        for i in range(len(params)):
            ref[i], ms[i], vs[i] = _numpy_adamw(ref[i], grads[i], ms[i], vs[i], lr, step, *hparams[i], gscale, ok,
                                                *betas, eps)
    for i in range(len(params)):
        np.testing.assert_allclose(np.array(got_p[i]), ref[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(got_m[i]), ms[i], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.array(got_v[i]), vs[i], rtol=1e-5, atol=1e-12)


def _train(enabled: bool, dtype: str, steps: int = 3, norm: str = "flat"):
    """Parameter moves and the last gradient norm of `steps` steps; `norm` the clip norm's way ("flat": one sum per
    gradient, the way "auto" took on CUDA before the strided kernel became its default)."""
    saved, multi_tensor.ENABLED = multi_tensor.ENABLED, enabled
    saved_norm, step_module.NORM_SQUARES = step_module.NORM_SQUARES, norm
    try:
        config = get_config("tiny")
        model = cast(init_weights(CLIP(config), 0), dtype)
        rng = np.random.default_rng(0)
        images = mx.array(rng.standard_normal((4, config.vision_config.image_size,
                                               config.vision_config.image_size, 3)).astype(np.float32)).astype(
            model.logit_scale.dtype)
        ids = mx.array(rng.integers(1, 100, (4, 12)).astype(np.int32))
        args = TrainingArgs(lr=1e-3, weight_decay=0.1, layer_decay=0.8)
        optimizer = build_optimizer(model, args, total_steps=100)
        start = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters())}
        step = make_step(model, optimizer, make_loss_fn("clip"), args.grad_clip)
        for _ in range(steps):
            out = step(images, ids, mx.arange(4))
            mx.eval(out, model.state, optimizer.state)
        end = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.trainable_parameters())}
        return {k: v - start[k] for k, v in end.items()}, float(out[1].item())
    finally:
        multi_tensor.ENABLED = saved
        step_module.NORM_SQUARES = saved_norm


# The clip factors differ by fp32 summation order only; in bf16 that can flip a weight's rounding (one ulp of the
# weight, more than its move), so there only the whole model's move is compared, as above.
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_norm_kernel_gives_the_per_parameter_steps(dtype, tol):
    """NORM_SQUARES = "kernel" (the CUDA default under "auto") changes only how the clip norm is summed: the same norm
    to fp32 rounding, and the same moves."""
    fast, fast_norm = _train(False, dtype, norm="kernel")
    slow, slow_norm = _train(False, dtype)
    assert abs(fast_norm - slow_norm) <= 1e-5 * slow_norm
    total = np.sqrt(sum(np.sum(w**2) for w in slow.values()))
    assert total > 0 and np.sqrt(sum(np.sum((fast[k] - w) ** 2) for k, w in slow.items())) <= tol * total
    for name, want in slow.items() if dtype == "float32" else ():
        if not name.endswith("k_proj.bias"):  # round-off gradients (see above)
            assert np.linalg.norm(fast[name] - want) <= 1e-3 * np.linalg.norm(want), name


# Compared: how far each parameter moved in 3 steps, and the last gradient norm. The key projections' biases get
# round-off gradients only (softmax does not see a bias added to every key): Adam turns that noise into moves of
# ~lr·|g|/eps in both paths, so in fp32 they are only checked to stay that small. In bf16 only the whole model's move
# is compared: the per-parameter path keeps bf16 moments, whose small increments round away (8 bits), so single weights
# move differently by up to a whole update (measured on an H200: a patch-embedding weight moved -9.4e-5 there and
# -5.9e-5 here, 9 of its ulps); the kernel's own arithmetic is checked per element against float64 numpy above.
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_train_step_matches_per_parameter_path(dtype, tol):
    fast, fast_norm = _train(True, dtype)
    slow, slow_norm = _train(False, dtype)
    assert abs(fast_norm - slow_norm) <= min(tol, 1e-2) * slow_norm
    total = np.sqrt(sum(np.sum(w**2) for w in slow.values()))
    assert total > 0 and np.sqrt(sum(np.sum((fast[k] - w) ** 2) for k, w in slow.items())) <= tol * total
    for name, want in slow.items() if dtype == "float32" else ():
        if name.endswith("k_proj.bias"):
            assert max(np.linalg.norm(fast[name]), np.linalg.norm(want)) <= 1e-4 * total, name
        else:
            assert np.linalg.norm(fast[name] - want) <= tol * np.linalg.norm(want), name
