"""Precision policies on `tiny`: bf16-mixed keeps fp32 master weights and optimizer state while computing in bf16,
with losses close to fp32; float16's dynamic loss scaling skips and halves on overflow, grows after N good steps, and
gives the unscaled gradient. References: the fp32 run, a plain-Python replay of the scaling rule."""

import math

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_clip.config import get_config
from mlx_clip.memory import build_train_step, synthetic_batch
from mlx_clip.model import CLIP
from mlx_clip.precision import (LossScaling, apply_policy, init_loss_scale, max_bad_steps, policy_loss,
                                resolve_policy, scaled_step, update_loss_scale)
from mlx_clip.train.args import TrainingArgs
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn, make_step


def _tiny(policy: str):
    mx.random.seed(0)
    model = apply_policy(CLIP(get_config("tiny")), resolve_policy(policy))
    mx.eval(model.parameters())
    return model


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _train(policy: str, steps: int = 3, batch: int = 8):
    """Losses of `steps` compiled steps, the model, its optimizer and the dtypes the forward pass saw."""
    model = _tiny(policy)
    args = TrainingArgs(lr=1e-3, dtype=policy)
    optimizer = build_optimizer(model, args, steps)
    seen = []
    base = make_loss_fn("clip")

    def loss_fn(model, images, ids, labels):  # records what the pass computes with (runs while tracing)
        seen.append((images.dtype, model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype))
        return base(model, images, ids, labels)

    step = build_train_step(model, optimizer, loss_fn, args)
    losses = []
    for seed in range(steps):
        loss, _, applied = step(*synthetic_batch(model.config, batch, 32, seed))
        mx.eval(loss, applied, model.state, optimizer.state)
        assert applied.item()
        losses.append(loss.item())
    return losses, model, optimizer, seen


def test_auto_is_float32_on_cpu():
    assert mx.default_device() == mx.cpu and resolve_policy("auto").name == "float32"
    with pytest.raises(ValueError, match="--dtype"):
        resolve_policy("float8")


def test_bf16_mixed_keeps_fp32_master_weights_and_computes_in_bf16():
    ref_losses, ref_model, _, ref_seen = _train("float32")
    losses, model, optimizer, seen = _train("bf16-mixed")
    assert ref_seen[0] == (mx.float32, mx.float32)
    assert seen and all(s == (mx.bfloat16, mx.bfloat16) for s in seen)  # the pass ran in bf16 ...
    for name, p in tree_flatten(model.parameters()):  # ... on copies: the stored weights stay fp32
        assert p.dtype == mx.float32, name
    moments = [v for k, v in tree_flatten(optimizer.state) if k.endswith((".m", ".v"))]
    assert moments and all(v.dtype == mx.float32 for v in moments)
    assert losses != ref_losses  # bf16 rounding shows ...
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # ... but the run follows fp32
    # The updates agree as a whole (per parameter, Adam's g / sqrt(v) magnifies rounding where g is near zero).
    init = dict(tree_flatten(_tiny("float32").parameters()))
    ref = dict(tree_flatten(ref_model.parameters()))
    update = np.concatenate([np.array(p - init[k]).ravel() for k, p in tree_flatten(model.parameters())])
    ref_update = np.concatenate([np.array(ref[k] - init[k]).ravel() for k in ref])
    assert _rel(update, ref_update) < 0.2


def test_pure_bfloat16_stores_and_computes_in_bf16():
    _, model, optimizer, seen = _train("bfloat16", steps=1, batch=2)
    assert all(s == (mx.bfloat16, mx.bfloat16) for s in seen)
    assert model.visual_projection.weight.dtype == mx.bfloat16


def _replay(flags, settings):
    """The scaling rule, written out in plain Python."""
    scale, good, out = settings.init_scale, 0, []
    for finite in flags:
        if finite:
            good += 1
            if good >= settings.growth_interval:
                scale, good = scale * settings.growth, 0
        else:
            scale, good = scale * settings.backoff, 0
        out.append(scale)
    return out


def test_loss_scale_update_rule_matches_a_replay():
    settings = LossScaling(init_scale=2.0**10, growth_interval=3)
    flags = np.random.default_rng(0).random(40) < 0.8
    state = {"scale": mx.array(settings.init_scale), "good_steps": mx.array(0, mx.int32)}
    scales = []
    for finite in flags:
        update_loss_scale(state, mx.array(bool(finite)), settings)
        scales.append(state["scale"].item())
    assert scales == _replay(flags, settings)


def _fp16_step(init_scale, growth_interval=2):
    model = _tiny("float16")
    args = TrainingArgs(lr=1e-3, dtype="float16")
    optimizer = build_optimizer(model, args, 10)
    settings = LossScaling(init_scale=init_scale, growth_interval=growth_interval)
    init_loss_scale(optimizer, settings)
    step = make_step(model, optimizer, policy_loss(make_loss_fn("clip"), resolve_policy("float16"), optimizer))
    return model, optimizer, scaled_step(step, optimizer, settings)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    model, optimizer, step = _fp16_step(init_scale=2.0**40)  # the scaled backward overflows fp16 (max 65504)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    loss, _, applied = step(*synthetic_batch(model.config, 8, 32))
    mx.eval(loss, applied, model.state, optimizer.state)
    assert math.isfinite(loss.item()) and not applied.item()
    for name, value in tree_flatten(model.parameters()):
        assert np.array_equal(np.array(value), before[name]), name
    assert optimizer.state["loss_scale"]["scale"].item() == 2.0**39


def test_fp16_scale_grows_after_good_steps():
    model, optimizer, step = _fp16_step(init_scale=2.0**8, growth_interval=2)
    scales = []
    for seed in range(4):
        _, _, applied = step(*synthetic_batch(model.config, 8, 32, seed))
        mx.eval(applied, model.state, optimizer.state)
        assert applied.item()
        scales.append(optimizer.state["loss_scale"]["scale"].item())
    assert scales == [2.0**8, 2.0**9, 2.0**9, 2.0**10]
    assert max_bad_steps("float16") > max_bad_steps("float32") == 3  # early overflows do not stop a run


def test_scaled_gradients_are_unscaled_at_the_weights():
    """The gradient under loss scaling is the gradient of the loss: the same at two scales, and close to the fp32
    gradient of the same (fp16) weights."""
    model = _tiny("float16")
    args = TrainingArgs(dtype="float16")
    optimizer = build_optimizer(model, args, 1)
    batch = synthetic_batch(model.config, 8, 32)
    grads = []
    for scale in (2.0**4, 2.0**12):
        optimizer.state["loss_scale"] = {"scale": mx.array(scale), "good_steps": mx.array(0, mx.int32)}
        fn = nn.value_and_grad(model, policy_loss(make_loss_fn("clip"), resolve_policy("float16"), optimizer))
        grads.append(dict(tree_flatten(fn(model, *batch)[1])))
    apply_policy(model, resolve_policy("float32"))
    ref = dict(tree_flatten(nn.value_and_grad(model, make_loss_fn("clip"))(model, *batch)[1]))
    for name in ref:
        if float(np.linalg.norm(np.array(ref[name]))) < 1e-3:  # fp16 rounding dominates tiny gradients
            continue
        assert grads[0][name].dtype == mx.float16
        assert _rel(grads[0][name], grads[1][name]) < 2e-2, name
        assert _rel(grads[1][name], ref[name]) < 5e-2, name
