"""Precision policies for training: which dtype the weights (and so the optimizer state) are stored in, which dtype the
forward and backward passes compute in, and whether the loss is scaled.

- float32: everything fp32.
- bfloat16: weights and compute in bf16 (least memory; updates smaller than bf16's resolution vanish), AdamW's first
  moment bf16 and its second fp32 (train.optim.moment_dtypes), each update computed in fp32 and rounded once.
- bf16-mixed: fp32 master weights and optimizer state; each step computes in bf16 on a cast copy, and the gradient
  arrives in fp32 (the cast's transpose), so small updates accumulate.
- float16: weights and compute in fp16 (AdamW's moments fp32: fp16's range would lose squared gradients) with dynamic
  loss scaling: the backward pass runs on loss * S so small gradients
  do not flush to zero; each gradient is divided by S at the weight, in fp32. An overflow (inf/nan gradient) skips the
  step (the compiled step's non-finite guard) and halves S; S doubles after `growth_interval` good steps in a row.
- auto: float32 on CPU (MLX-CPU half-precision matmul is a scalar loop), bfloat16 on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
from mlx.utils import tree_map


@dataclass(frozen=True)
class Policy:
    name: str
    param_dtype: mx.Dtype  # stored weights; the optimizer state's dtypes follow from them (optim.moment_dtypes)
    compute_dtype: mx.Dtype  # the forward and backward passes
    loss_scaling: bool = False

    @property
    def casts(self) -> bool:
        return self.param_dtype != self.compute_dtype


POLICIES = {
    "float32": Policy("float32", mx.float32, mx.float32),
    "bfloat16": Policy("bfloat16", mx.bfloat16, mx.bfloat16),
    "bf16-mixed": Policy("bf16-mixed", mx.float32, mx.bfloat16),
    "float16": Policy("float16", mx.float16, mx.float16, loss_scaling=True),
}


def resolve_policy(name: str) -> Policy:
    if name == "auto":
        name = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    if name not in POLICIES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]


def apply_policy(model, policy: Policy):
    """Store the floating parameters in the policy's parameter dtype."""
    from mlx_clip.io import cast

    return cast(model, policy.param_dtype)


# ---- the loss under a policy ---------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _cast_unscaled(dtype: mx.Dtype):
    """x -> x in `dtype` whose gradient comes back in x's dtype divided by the loss scale, computed in fp32."""

    @mx.custom_function
    def cast(x, scale):
        return x.astype(dtype)

    @cast.vjp
    def cast_vjp(primals, cotangent, output):
        x, scale = primals
        return (cotangent.astype(mx.float32) / scale).astype(x.dtype), mx.zeros_like(scale)

    return cast


@mx.custom_function
def _scale_backward(loss, scale):
    """Identity on the loss; multiplies the cotangent entering the backward pass by the loss scale."""
    return loss * 1


@_scale_backward.vjp
def _scale_backward_vjp(primals, cotangent, output):
    return cotangent * primals[1], mx.zeros_like(primals[1])


def policy_loss(loss_fn, policy: Policy, optimizer=None):
    """`loss_fn(model, images, ids, labels)` computed under `policy`: pixels in the compute dtype, the weights cast to it
    for the pass when they are stored wider (scalars such as logit_scale stay fp32) and, with loss scaling, the backward pass scaled by the scale kept in
    `optimizer.state["loss_scale"]` (an input of the compiled step; checkpoints save it). The value is the true loss."""
    if policy.compute_dtype == mx.float32 and not policy.loss_scaling:
        return loss_fn
    if policy.loss_scaling:
        init_loss_scale(optimizer)
    compute = policy.compute_dtype

    def to_compute(p, scale):
        if not mx.issubdtype(p.dtype, mx.floating):
            return p
        dtype = compute if p.ndim else p.dtype
        if scale is None:
            return p.astype(dtype)
        return _cast_unscaled(dtype)(p, scale)

    def loss_under_policy(model, images, ids, labels):
        images = images.astype(compute)  # fp32 pixels would promote the whole image tower back to fp32
        if not policy.casts and not policy.loss_scaling:
            return loss_fn(model, images, ids, labels).astype(mx.float32)
        scale = optimizer.state["loss_scale"]["scale"] if policy.loss_scaling else None
        master = model.parameters()
        model.update(tree_map(lambda p: to_compute(p, scale), master))
        try:
            loss = loss_fn(model, images, ids, labels).astype(mx.float32)
        finally:
            model.update(master)  # the model keeps its master weights; only the graph holds the cast copies
        return loss if scale is None else _scale_backward(loss, scale)

    loss_under_policy.feature_loss = getattr(loss_fn, "feature_loss", None)
    return loss_under_policy


# ---- dynamic loss scaling ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossScaling:
    init_scale: float = 2.0**16  # torch.amp.GradScaler's defaults
    growth_interval: int = 2000
    growth: float = 2.0
    backoff: float = 0.5


def init_loss_scale(optimizer, settings: LossScaling = LossScaling()) -> dict:
    """The scale state inside the optimizer state (kept when a resumed checkpoint already holds one)."""
    if "loss_scale" not in optimizer.state:
        optimizer.state["loss_scale"] = {"scale": mx.array(settings.init_scale, mx.float32),
                                         "good_steps": mx.array(0, mx.int32)}
    return optimizer.state["loss_scale"]


def update_loss_scale(state: dict, finite: mx.array, settings: LossScaling = LossScaling()) -> None:
    """After a step: overflow -> scale * backoff and the count restarts; else count + 1, and at growth_interval good
    steps in a row scale * growth and the count restarts."""
    good = mx.where(finite, state["good_steps"] + 1, 0)
    grow = good >= settings.growth_interval
    scale = state["scale"]
    state["scale"] = mx.where(finite, mx.where(grow, scale * settings.growth, scale), scale * settings.backoff)
    state["good_steps"] = mx.where(grow, 0, good).astype(mx.int32)


def max_bad_steps(dtype: str, default: int = 3) -> int:
    """Skipped steps in a row the loop tolerates: with loss scaling, also the overflows that halve the first scale."""
    if not resolve_policy(dtype).loss_scaling:
        return default
    return default + int(math.log2(LossScaling().init_scale))


def scaled_step(step, optimizer, settings: LossScaling = LossScaling()):
    """The step followed by the scale update (the step itself skips a non-finite update)."""

    def step_with_scaling(images, ids, labels):
        loss, norm, applied = step(images, ids, labels)
        update_loss_scale(optimizer.state["loss_scale"], applied, settings)
        return loss, norm, applied

    return step_with_scaling
