"""The compiled training step with explicit state: loss -> grads -> clip -> AdamW -> clamp, skipped when non-finite."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from mlx_clip import cpu_streams
from mlx_clip.cpu_streams import Spread
from mlx_clip.losses import accumulated_value_and_grad, combined_loss, parse_loss_spec
from mlx_clip.switches import env_switch, env_word
from mlx_clip.train import distributed as dist
from mlx_clip.train import multi_tensor
from mlx_clip.train.distributed import average_gradients, global_batch
from mlx_clip.train.optim import clamp_logit_scale


def make_feature_loss(spec: str, outputs: dict | None = None, **options):
    """loss(image_features, text_features, logit_scale, labels, logit_bias=None, views=None, neg_text_features=None)
    on normalized features.

    `labels` is the (B,) label array, or a dict of step inputs (`mlx_clip.train.loss_inputs`): "labels" plus
    bank_image / bank_text / bank_ids / sample_ids (mined_negative), neg_valid (negclip) and logit_scale (a scheduled
    temperature, used in place of the model's). `views` are the per-view image features (multiscale; the first is
    `image_features`). `options` (beta, tau_plus, k, weights) reach the terms whose signatures name them. With
    `outputs` (a dict), the global batch's detached features and sample ids are written there for a negative bank.
    """
    terms = parse_loss_spec(spec)

    def feature_loss(image_features, text_features, logit_scale, labels, logit_bias=None, views=None,
                     neg_text_features=None):
        inputs = labels if isinstance(labels, dict) else {"labels": labels}
        # Under mlx.launch, the loss of the global batch: all ranks' pairs are negatives (identity in one process).
        image_features, text_features, labels = global_batch(image_features, text_features, inputs["labels"])
        features = dict(image_features=image_features, text_features=text_features, labels=labels,
                        logit_scale=inputs.get("logit_scale", logit_scale), **options)
        if logit_bias is not None:
            features["logit_bias"] = logit_bias
        features["image_features_per_view"] = [image_features] + [_gathered(v) for v in (views or [])[1:]]
        if neg_text_features is not None:
            features["neg_text_features"] = _gathered(neg_text_features)
            features["neg_valid"] = _gathered(inputs["neg_valid"], grad=False)
        if "bank_ids" in inputs:
            features.update(bank_image=inputs["bank_image"], bank_text=inputs["bank_text"],
                            bank_ids=inputs["bank_ids"], ids=_gathered(inputs["sample_ids"], grad=False))
            if outputs is not None:  # for the bank, outside the step: this batch as later steps will see it
                outputs.update(image=mx.stop_gradient(image_features).astype(mx.float32),
                               text=mx.stop_gradient(text_features).astype(mx.float32), ids=features["ids"])
        return combined_loss(terms, **features)

    return feature_loss


def _gathered(x: mx.array, grad: bool = True) -> mx.array:
    """Every rank's rows of `x` (itself in one process)."""
    if dist.world_size() == 1:
        return x
    return dist.gather_with_grad(x) if grad else mx.distributed.all_gather(x, group=dist.group())


def make_loss_fn(spec: str, outputs: dict | None = None, **options):
    """loss(model, images, ids, labels) for a spec like 'clip' or 'clip:1,multi_positive:0.5'.

    `images` (B, H, W, C), or (B, V, H, W, C) for V views of each image (multiscale). `labels` as in
    `make_feature_loss`; its "neg_ids" (negclip's perturbed captions) are encoded here, with the captions.
    """
    feature_loss = make_feature_loss(spec, outputs, **options)

    def loss_fn(model, images, ids, labels):
        views = None
        if images.ndim == 5:
            b, v = images.shape[:2]
            flat = model.encode_image(images.reshape(b * v, *images.shape[2:]), normalize=True)  # (B*V, D)
            views = [flat.reshape(b, v, -1)[:, i] for i in range(v)]
        image_features = views[0] if views else model.encode_image(images, normalize=True)
        neg_ids = labels.get("neg_ids") if isinstance(labels, dict) else None
        neg_text_features = None
        if neg_ids is None:
            text_features = model.encode_text(ids, normalize=True)
        else:  # one text pass for the captions and their perturbations
            both = model.encode_text(mx.concatenate(_same_length(ids, neg_ids)), normalize=True)
            text_features, neg_text_features = both[: ids.shape[0]], both[ids.shape[0] :]
        return feature_loss(image_features, text_features, mx.exp(model.logit_scale), labels, model.get("logit_bias"),
                            views=views, neg_text_features=neg_text_features)

    loss_fn.feature_loss = feature_loss  # for gradient accumulation, which needs the loss of features
    return loss_fn


def _same_length(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
    """Two id batches trimmed to different lengths (tokenizer.trim_padding), zero-padded back to the longer."""
    n = max(a.shape[1], b.shape[1])
    return tuple(mx.pad(x, [(0, 0), (0, n - x.shape[1])]) if x.shape[1] < n else x for x in (a, b))


def _apply(model, optimizer, loss, grads, grad_clip: float):
    """Clip, update, clamp; keep the old values when the loss or gradient is not finite."""
    grads = average_gradients(grads)  # the mean over mlx.launch ranks, before clipping (identity in one process)
    norm = _global_norm(grads)
    factor = mx.minimum(grad_clip / (norm + 1e-6), 1.0) if grad_clip > 0 else mx.array(1.0)
    finite = mx.isfinite(loss) & mx.isfinite(norm)
    if hasattr(optimizer, "guarded_update"):  # clip and guard inside the update: one pass over memory (optim.py)
        optimizer.guarded_update(model, grads, factor, finite)
        clamp_logit_scale(model)
        return norm, finite
    grads = tree_map(lambda g: g * factor.astype(g.dtype), grads)
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
    """A compiled `step(images, ids, labels) -> (loss, grad_norm, applied)`; `labels` may be a dict of step inputs.

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


# How each gradient's sum of squares is taken: "dot" (one BLAS dot product: one kernel and one read, where
# square-then-sum is two kernels and a squared copy; BLAS spreads it over the CPU's cores), "flat" (flattened, squared
# and summed by MLX: 4 graph nodes each, a copy of a transposed gradient) or "reduce" (square, then MLX's sum, over
# the gradient as it lies: 2 graph nodes each). "auto": dot on the CPU, "kernel" (below) on CUDA, flat on other GPUs,
# where each cuBLAS call costs ~28 us of host work (stream capture, heuristics, workspace; measured with py-spy on an
# H200) against a few us for MLX's own kernels. "reduce" was the GPU's way in sessions 16-17 (~800 fewer nodes for
# the host-bound ViT-B/32 step); on an H200 in session 18 it raised ViT-B-16's peak 21,979 -> 23,423 MiB (four runs
# at 23,423) at the same step time (102.5-104.0 vs 104.3 ms), and ViT-B-32's step moved with the host either way
# (benchmarks/results/gpu-s18-h200.md), so the GPU went back to "flat". "concat" (opt-in, for host-bound GPUs): the
# flattened gradients joined NORM_CHUNK at a time and each join squared and summed, ~4 graph nodes per 64 parameters
# (the ViT-B/32 step's norm was ~1,600 of its 6,782 nodes), for one extra copy of the gradients: on an H100 the
# ViT-B/32 step -3% for +2.9 GiB of peak (benchmarks/results/gpu-aligned-h100-s11.md), so not the GPU default.
# "kernel" (CUDA, else as "auto"): multi_tensor.sum_of_squares_strided, our kernel reading up to 24 gradients a launch
# where they lie (transposed ones too, so no copies): ~20 graph nodes in all, ~1,200 fewer than "flat". Made in
# session 16 for the host-bound ViT-B/32 step; correct to 1e-7 of float64 on an H200 (session 17). "auto" takes it on
# CUDA since session 27 (GPU_NORM_KERNEL): the ViT-B/32 b256 step's host work -7 to -9 ms, the step 45.1 -> 36.6 ms
# alone and 1.34x of torch.compile paired (MFU 45.6%) on an H200, ViT-B/16 equal in time and peak; its cost is
# ViT-B/32's queued-run peak, 13.1-14.8 GiB against the flat sums' 8.6-12.9 (benchmarks/results/gpu-s27-h200.md),
# which `--memory-limit` bounds where memory matters more. MLXCLIP_GPU_NORM_KERNEL=0: "auto" sums flat on CUDA too.
NORM_WAYS = ("auto", "dot", "reduce", "flat", "concat", "kernel")
NORM_SQUARES = env_word("MLXCLIP_NORM_SQUARES", NORM_WAYS, "auto")  # any of them (separate-process A/Bs on a card)
GPU_NORM_KERNEL = env_switch("MLXCLIP_GPU_NORM_KERNEL", True)
NORM_CHUNK = 64
# "dot" on a long gradient: MLX makes a 1-D dot one (1 x n) @ (n x 1) product, which this CPU's BLAS runs as one
# serial loop, ~1.2 ns an element (the `small` token table's 6.3 M: 7.8 ms, a quarter of that step's fixed part). Cut
# into rows of DOT_ROW, one short product each in one batched call, it runs ~5x faster from ~150 K elements on (6.3 M:
# 1.5 ms; 590 K: 0.46 -> 0.22 ms) and equal below (benchmarks/perf-notes.md change 48); a few graph nodes more each.
DOT_ROW = 8192
DOT_ROWS_MIN = 1 << 17


def _dot_squares(flat: mx.array) -> mx.array:
    """Σ flat² of a 1-D fp32 array as a 0-d array: one dot, or past DOT_ROWS_MIN elements one per DOT_ROW-long row
    and the rest's dot."""
    whole = flat.size - flat.size % DOT_ROW
    if whole < DOT_ROWS_MIN:
        return flat @ flat
    rows = (flat if whole == flat.size else flat[:whole]).reshape(-1, 1, DOT_ROW)
    total = (rows @ rows.swapaxes(-1, -2)).sum()  # (rows, 1, 1) partial sums; the transposed view is not copied
    if whole == flat.size:
        return total
    rest = flat[whole:]
    return total + rest @ rest


def _sum_of_squares(g: mx.array) -> mx.array:
    """Σ g² in fp32: 0-d (dot), shape (1,) (flat), or with g's dimensions kept as 1s (reduce)."""
    way = NORM_SQUARES
    if way in ("auto", "kernel"):  # "kernel" reaches here off CUDA only
        way = "dot" if cpu_streams.on_cpu() else "flat"
    if way != "reduce":
        # an explicit length: a 1-D gradient (biases, LayerNorm gains) comes back as it is, where reshape(-1) would be
        # a graph node, and each node costs the host time of a host-bound GPU step (~200 of them a ViT step)
        flat = g.reshape(g.size).astype(mx.float32)
        # flat: kept as one element (keepdims), as "reduce" does: a full reduction to 0-d is a Sum and a Squeeze, one
        # graph node more per gradient (~400 a ViT step, whose GPU step is host-bound); _global_norm reshapes once
        return _dot_squares(flat) if way == "dot" else mx.sum(flat * flat, keepdims=True)
    # Reduced where it lies, dimensions kept: flattening first copied every transposed weight gradient (autodiff's
    # (xᵀg)ᵀ), and a full reduction's result is squeezed by a node of its own; so 2 graph nodes an array, not 4
    # (~800 fewer in a ViT-B/32 step, whose GPU step is host-bound). _global_norm squeezes the total once.
    return mx.sum(mx.square(g.astype(mx.float32)), keepdims=True)


def _global_norm(grads) -> mx.array:
    arrays = [g for _, g in tree_flatten(grads)]
    if multi_tensor.applies(arrays):  # CUDA: a few launches instead of one reduction (and its views) per array
        return mx.sqrt(multi_tensor.sum_of_squares(arrays))
    strided = NORM_SQUARES == "kernel" or (NORM_SQUARES == "auto" and GPU_NORM_KERNEL)
    if multi_tensor.applies(arrays, switched_on=strided):  # the same, without the copies
        return mx.sqrt(multi_tensor.sum_of_squares_strided(arrays))
    if NORM_SQUARES == "concat":
        joined = (mx.concatenate([g.reshape(-1) for g in arrays[i:i + NORM_CHUNK]]).astype(mx.float32)
                  for i in range(0, len(arrays), NORM_CHUNK))
        return mx.sqrt(sum(mx.sum(x * x) for x in joined))
    # In batch-parallel mode MKL runs one thread per call, so the dot products go to one CPU stream per core, as the
    # update does (elsewhere MKL's own threads take each one; on a GPU there is one stream).
    spread = Spread(active=cpu_streams.ENABLED)
    squares = []
    for g in arrays:
        with spread.stream_for(g.size):
            squares.append(_sum_of_squares(g))
    total = sum(squares)
    return mx.sqrt(total if total.ndim == 0 else total.reshape(()))  # a scalar: the clip factor scales every array
