"""The compiled training step with explicit state: loss -> grads -> clip -> AdamW -> clamp, skipped when non-finite."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_clip.losses import accumulated_value_and_grad, combined_loss, parse_loss_spec
from mlx_clip.train.distributed import average_gradients, global_batch
from mlx_clip.train.optim import clamp_logit_scale

# Losses the trainer can feed from one batch of (image, caption, label); the others need extra inputs (a negative
# bank, perturbed captions, several views) and are driven by their own helpers.
BATCH_LOSSES = {"clip", "siglip", "multi_positive", "hard_negative"}


def _check_spec(spec: str):
    terms = parse_loss_spec(spec)
    unsupported = [name for name, _ in terms if name not in BATCH_LOSSES]
    if unsupported:
        raise ValueError(f"--loss {spec!r}: {', '.join(unsupported)} cannot be trained from plain batches yet; "
                         f"use {', '.join(sorted(BATCH_LOSSES))}")
    return terms


def make_feature_loss(spec: str, **options):
    """loss(image_features, text_features, logit_scale, labels, logit_bias=None) on normalized features; `options`
    (e.g. beta, tau_plus for hard_negative) reach the terms whose signatures name them."""
    terms = _check_spec(spec)

    def feature_loss(image_features, text_features, logit_scale, labels, logit_bias=None):
        # Under mlx.launch, the loss of the global batch: all ranks' pairs are negatives (identity in one process).
        image_features, text_features, labels = global_batch(image_features, text_features, labels)
        features = dict(image_features=image_features, text_features=text_features, logit_scale=logit_scale,
                        labels=labels, **options)
        if logit_bias is not None:
            features["logit_bias"] = logit_bias
        return combined_loss(terms, **features)

    return feature_loss


def make_loss_fn(spec: str, **options):
    """loss(model, images, ids, labels) for a spec like 'clip' or 'clip:1,multi_positive:0.5'."""
    feature_loss = make_feature_loss(spec, **options)

    def loss_fn(model, images, ids, labels):
        return feature_loss(model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True),
                            mx.exp(model.logit_scale), labels, model.get("logit_bias"))

    loss_fn.feature_loss = feature_loss  # for gradient accumulation, which needs the loss of features
    return loss_fn


def _apply(model, optimizer, loss, grads, grad_clip: float):
    """Clip, update, clamp; keep the old values when the loss or gradient is not finite."""
    grads = average_gradients(grads)  # the mean over mlx.launch ranks, before clipping (identity in one process)
    norm = _global_norm(grads)
    if grad_clip > 0:
        factor = mx.minimum(grad_clip / (norm + 1e-6), 1.0)
        grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
    finite = mx.isfinite(loss) & mx.isfinite(norm)
    old_params = model.trainable_parameters()
    old_opt = tree_map(lambda x: x, optimizer.state)  # new containers: the optimizer mutates its dicts in place
    optimizer.update(model, grads)
    clamp_logit_scale(model)
    # Keep the old values when the step is bad: `where` rather than Python control flow, to stay compiled.
    keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
    model.update(tree_map(keep, model.trainable_parameters(), old_params))
    _assign(optimizer.state, tree_map(keep, optimizer.state, old_opt))
    return norm, finite


def make_step(model: nn.Module, optimizer, loss_fn, grad_clip: float = 1.0, accum_freq: int = 1):
    """A compiled `step(images, ids, labels) -> (loss, grad_norm, applied)`.

    Model, optimizer and random state are the compiled function's explicit inputs and outputs, so the graph is traced
    once per batch shape. A non-finite loss or gradient leaves parameters and optimizer state untouched (`applied` 0).
    With `accum_freq` k > 1 the batch is encoded in k micro-batches and the gradient is that of the whole batch
    (GradCache: every negative still counts); that pass evaluates between micro-batches, so only the update is compiled.
    """
    state = [model.state, optimizer.state, mx.random.state]
    if accum_freq > 1:
        update = mx.compile(lambda loss, grads: _apply(model, optimizer, loss, grads, grad_clip), inputs=state,
                            outputs=state)

        def accumulated_step(images, ids, labels):
            loss_of_features = partial(_with_labels, loss_fn.feature_loss, labels)
            loss, grads = accumulated_value_and_grad(model, loss_of_features, images, ids, accum_freq)
            norm, finite = update(loss, grads)
            return loss, norm, finite

        return accumulated_step

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def step(images, ids, labels):
        loss, grads = loss_and_grad(model, images, ids, labels)
        norm, finite = _apply(model, optimizer, loss, grads, grad_clip)
        return loss, norm, finite

    return step


def _with_labels(feature_loss, labels, image_features, text_features, logit_scale, logit_bias=None):
    return feature_loss(image_features, text_features, logit_scale, labels, logit_bias)


def _assign(target, source) -> None:
    """Write `source`'s leaves into `target`'s containers in place (assigning `optimizer.state` would re-initialise)."""
    items = target.items() if isinstance(target, dict) else enumerate(target)
    for key, value in list(items):
        if isinstance(value, (dict, list)):
            _assign(value, source[key])
        else:
            target[key] = source[key]


def _global_norm(grads) -> mx.array:
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))
