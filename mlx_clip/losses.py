"""Contrastive losses as pure functions of features, a registry to combine them, and exact gradient accumulation.

Conventions (open_clip's): features arrive L2-normalized, `logit_scale` is the multiplier (already exponentiated:
the model stores its log), every loss is a mean over the batch and symmetric over image→text and text→image unless
its docstring says otherwise. Everything is computed from logsumexp / softplus, so logit_scale = 1e4 stays finite.
Hard-negative losses live in `mlx_clip.hard_negatives` and are re-exported here.

Temperature defaults for fine-tuning
- CLIP / InfoNCE-family: learnable, initialised from the checkpoint (pretrained CLIPs sit at the clamp, 100) and
  clamped to [1, 100] after every optimizer step (`clamp_logit_scale`), as open_clip does. From scratch: 1/0.07.
  On a small domain set a fixed scale (`temperature_schedule("fixed", ...)` at the checkpoint value) is a sound choice.
  Scheduled (`mlxclip finetune --temperature scheduled`): `temperature_schedule("cosine", ...)` from the checkpoint's
  value (or START) to 100 (or END), the multiplier an input of each step.
- SigLIP: logit_scale initialised to log 10 (multiplier 10) and logit_bias to -10 (Zhai et al. 2023), both learnable.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from mlx_clip.hard_negatives import (  # re-exported: one import site for every loss
    NegativeBank,
    diagonal_cross_entropy,
    hard_negative_loss,
    mined_negative_loss,
    negclip_loss,
    perturb_captions,
    softplus,
)

SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # log of the multiplier, as the model stores it
SIGLIP_INIT_LOGIT_BIAS = -10.0
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def clip_loss(image_features: mx.array, text_features: mx.array, logit_scale: mx.array) -> mx.array:
    """Symmetric InfoNCE (CLIP): cross-entropy of each image over the batch texts and of each text over the images."""
    logits = logit_scale * (image_features @ text_features.T)  # (B_img, B_txt)
    return (diagonal_cross_entropy(logits) + diagonal_cross_entropy(logits.T)) / 2


def siglip_loss(
    image_features: mx.array, text_features: mx.array, logit_scale: mx.array, logit_bias: mx.array
) -> mx.array:
    """Pairwise sigmoid loss (SigLIP): every (image, text) pair is a binary match / no-match decision.

    Summed over all B² pairs and divided by B, as open_clip's `SigLipLoss`. Init: logit_scale log 10, bias -10.
    """
    logits = logit_scale * (image_features @ text_features.T) + logit_bias
    n = logits.shape[0]
    signs = 2 * mx.eye(n, dtype=logits.dtype) - 1  # +1 on matches, -1 elsewhere
    return mx.sum(softplus(-signs * logits)) / n  # -log σ(z) = softplus(-z)


def multi_positive_loss(
    image_features: mx.array, text_features: mx.array, logit_scale: mx.array, labels
) -> mx.array:
    """Label-aware contrastive loss (FLYP / UniCL / SupCon-style): same label ⇒ positive, not negative.

    Each image's target is the uniform distribution over the texts sharing its label (itself included), and
    symmetrically for texts: loss_i = logsumexp_j(l_ij) - mean_{j: y_j = y_i} l_ij. All labels distinct gives clip_loss.
    `labels`: (B,) integers (class ids, or caption ids so that duplicate captions count as one).
    """
    labels = mx.array(labels)
    logits = logit_scale * (image_features @ text_features.T)
    positives = (labels[:, None] == labels[None, :]).astype(logits.dtype)  # symmetric
    targets = positives / positives.sum(axis=1, keepdims=True)

    def soft_cross_entropy(rows: mx.array) -> mx.array:
        return mx.mean(mx.logsumexp(rows, axis=1) - mx.sum(targets * rows, axis=1))

    return (soft_cross_entropy(logits) + soft_cross_entropy(logits.T)) / 2


MULTISCALE_BASES = ("clip", "siglip", "multi_positive")


def multiscale_loss(
    image_features_per_view: list[mx.array],
    text_features: mx.array,
    logit_scale: mx.array,
    weights: list[float] | None = None,
    base: str = "clip",
    logit_bias: mx.array | None = None,
    labels=None,
) -> mx.array:
    """Several views of each image (a global view, local crops, other resolutions), each contrasted with its text.

    Returns Σ_v w_v · base(view_v, text) / Σ_v w_v: weights are normalised, so adding views does not change the
    loss scale and the term weight in a combined spec keeps its meaning. `weights=None` is uniform. `base` is one of
    MULTISCALE_BASES; `logit_bias` (siglip) and `labels` (multi_positive) are passed on to it.
    """
    if base not in MULTISCALE_BASES:
        raise ValueError(f"multiscale base must be one of {MULTISCALE_BASES}, got {base!r}")
    views = list(image_features_per_view)
    if not views:
        raise ValueError("multiscale_loss needs at least one view")
    weights = [1.0] * len(views) if weights is None else [float(w) for w in weights]
    if len(weights) != len(views):
        raise ValueError(f"{len(weights)} weights for {len(views)} views")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"view weights must be finite, >= 0 and not all 0, got {weights}")
    extra = {"siglip": {"logit_bias": logit_bias}, "multi_positive": {"labels": labels}}.get(base, {})
    total = sum(w * LOSSES[base](view, text_features, logit_scale, **extra) for w, view in zip(weights, views))
    return total / sum(weights)


# ---------------------------------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------------------------------


def clamp_logit_scale(log_scale, max_scale: float = 100.0) -> mx.array:
    """Clamp the *log* logit scale to [0, log max_scale] (multiplier in [1, max_scale]), as open_clip does after
    every optimizer step."""
    return mx.clip(mx.array(log_scale), 0.0, math.log(max_scale))


TEMPERATURE_KINDS = ("fixed", "linear", "cosine", "exp")


def temperature_schedule(kind: str, step: int, total_steps: int, start: float, end: float) -> float:
    """The logit-scale multiplier at `step` for a fixed or scheduled temperature; a pure function of the step.

    fixed: `start` throughout. linear / cosine / exp: from `start` at step 0 to `end` at `total_steps` (held after),
    interpolating the multiplier linearly, along a half cosine, or geometrically (linearly in log scale).
    A learnable temperature does not use this: it is the model's `logit_scale` parameter, clamped after each step.
    """
    if kind not in TEMPERATURE_KINDS:
        raise ValueError(f"unknown temperature schedule {kind!r}; choose from {TEMPERATURE_KINDS}")
    if kind == "fixed":
        return float(start)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 for a {kind} schedule, got {total_steps}")
    t = min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * t
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * t)) / 2
    if start <= 0 or end <= 0:
        raise ValueError("an exp schedule needs start > 0 and end > 0")
    return math.exp(math.log(start) + (math.log(end) - math.log(start)) * t)


def logit_scale_for_step(policy: str, log_scale: mx.array, step: int = 0, total_steps: int = 1,
                         start: float = 100.0, end: float = 100.0) -> mx.array:
    """The multiplier a loss should see: exp(log_scale) if `policy` is "learnable" (gradient flows into the
    parameter; clamp it after the optimizer step), else the constant `temperature_schedule(policy, ...)`."""
    if policy == "learnable":
        return mx.exp(log_scale)
    return mx.array(temperature_schedule(policy, step, total_steps, start, end), dtype=mx.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Registry and combination
# ---------------------------------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., mx.array]] = {
    "clip": clip_loss,
    "siglip": siglip_loss,
    "multi_positive": multi_positive_loss,
    "hard_negative": hard_negative_loss,
    "mined_negative": mined_negative_loss,
    "negclip": negclip_loss,
    "multiscale": multiscale_loss,
}


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """"clip:1,siglip:0.5" -> [("clip", 1.0), ("siglip", 0.5)]. A missing weight means 1; weights must be > 0."""
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, _, weight_text = part.strip().partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty loss name in spec {spec!r}")
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in spec {spec!r}; known: {', '.join(LOSSES)}")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} for loss {name!r}: not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"bad weight {weight_text!r} for loss {name!r}: must be finite and > 0")
        if name in dict(terms):
            raise ValueError(f"loss {name!r} appears twice in spec {spec!r}")
        terms.append((name, weight))
    return terms


def loss_terms(spec: str | list[tuple[str, float]], **features) -> dict[str, mx.array]:
    """Each weighted term of `spec`, by name. A loss gets the `features` its signature names and no others;
    a required argument missing from `features` raises a ValueError naming the loss and the argument."""
    terms = parse_loss_spec(spec) if isinstance(spec, str) else spec
    out = {}
    for name, weight in terms:
        fn = LOSSES[name]
        params = inspect.signature(fn).parameters
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in features]
        if missing:
            raise ValueError(f"loss {name!r} needs {', '.join(missing)}, which were not given")
        out[name] = weight * fn(**{p: features[p] for p in params if p in features})
    return out


def combined_loss(spec: str | list[tuple[str, float]], **features) -> mx.array:
    """Σ weight · loss over the terms of `spec`, e.g. combined_loss("clip:1,siglip:0.5", image_features=...,
    text_features=..., logit_scale=..., logit_bias=...). Features a term does not name are ignored by it."""
    return sum(loss_terms(spec, **features).values())


# ---------------------------------------------------------------------------------------------------------------------
# Gradient accumulation with full-batch negatives (GradCache, Gao et al. 2021; open_clip --accum-freq)
# ---------------------------------------------------------------------------------------------------------------------


def _l2_normalize(x: mx.array) -> mx.array:
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def _heads(model: nn.Module) -> dict[str, mx.array]:
    """The loss's own parameters on the model: `logit_scale` (log) and, for SigLIP, `logit_bias`."""
    return {k: getattr(model, k) for k in ("logit_scale", "logit_bias") if getattr(model, k, None) is not None}


def _loss_from_features(loss_fn, image_features, text_features, heads) -> mx.array:
    extra = {"logit_bias": heads["logit_bias"]} if "logit_bias" in heads else {}
    scale = mx.exp(heads["logit_scale"])
    return loss_fn(_l2_normalize(image_features), _l2_normalize(text_features), scale, **extra)


def model_loss(model: nn.Module, loss_fn: Callable, images: mx.array, texts: mx.array) -> mx.array:
    """The one-batch loss: encode, normalize, loss_fn(img, txt, exp(model.logit_scale)[, logit_bias=...])."""
    return _loss_from_features(loss_fn, model.encode_image(images), model.encode_text(texts), _heads(model))


def accumulated_value_and_grad(
    model: nn.Module, loss_fn: Callable, images: mx.array, texts: mx.array, micro_batches: int
) -> tuple[mx.array, dict]:
    """(loss, grads) of `model_loss` on the whole batch, holding only one micro-batch's activations at a time.

    Pass 1 encodes every micro-batch without a graph and caches the features. The loss and its gradient with respect
    to all cached features (and to logit_scale / logit_bias) are then taken once. Pass 2 re-encodes each micro-batch
    with a graph and backpropagates the surrogate Σ features_mb · grad_slice, whose parameter gradient is exactly this
    micro-batch's share of the full gradient; the shares are summed. Every loss still sees every negative.

    `loss_fn(image_features, text_features, logit_scale[, logit_bias=])` gets normalized features of the whole batch
    (bind labels etc. with functools.partial). `model` needs `encode_image`, `encode_text`, a top-level `logit_scale`
    (log) and optionally `logit_bias`. The encoders must be deterministic (no dropout): both passes must agree.
    Micro-batches may be uneven (sizes differ by at most one). Returns grads shaped like trainable_parameters().
    """
    n = images.shape[0]
    if not 1 <= micro_batches <= n:
        raise ValueError(f"micro_batches must be in [1, batch size {n}], got {micro_batches}")
    bounds = [round(i * n / micro_batches) for i in range(micro_batches + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))

    cached_image, cached_text = [], []
    for lo, hi in spans:
        image_f, text_f = model.encode_image(images[lo:hi]), model.encode_text(texts[lo:hi])
        mx.eval(image_f, text_f)  # evaluate now so no micro-batch graph outlives its loop turn
        cached_image.append(image_f)
        cached_text.append(text_f)
    image_all, text_all = mx.concatenate(cached_image), mx.concatenate(cached_text)

    heads = _heads(model)
    feature_loss = lambda i, t, h: _loss_from_features(loss_fn, i, t, h)  # noqa: E731
    loss, (grad_image, grad_text, grad_heads) = mx.value_and_grad(feature_loss, argnums=(0, 1, 2))(
        image_all, text_all, heads
    )
    mx.eval(loss, grad_image, grad_text, grad_heads)

    def surrogate(x, ids, g_image, g_text):
        return mx.sum(model.encode_image(x) * g_image) + mx.sum(model.encode_text(ids) * g_text)

    surrogate_grad = nn.value_and_grad(model, surrogate)
    grads = None
    for lo, hi in spans:
        _, g = surrogate_grad(images[lo:hi], texts[lo:hi], grad_image[lo:hi], grad_text[lo:hi])
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads)

    # logit_scale / logit_bias do not enter the surrogate; their gradient comes from the feature-level pass.
    for name, g in grad_heads.items():
        if name in grads:  # absent when frozen
            grads[name] = grads[name] + g
    return loss, grads


__all__ = [
    "LOSSES", "MULTISCALE_BASES", "TEMPERATURE_KINDS", "NegativeBank", "accumulated_value_and_grad",
    "clamp_logit_scale", "clip_loss", "combined_loss", "diagonal_cross_entropy", "hard_negative_loss",
    "logit_scale_for_step", "loss_terms", "mined_negative_loss", "model_loss", "multi_positive_loss",
    "multiscale_loss", "negclip_loss", "parse_loss_spec", "perturb_captions", "siglip_loss", "softplus",
    "temperature_schedule",
]
