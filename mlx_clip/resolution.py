"""Image resolution as a choice: position embeddings resampled to any grid (bicubic, as open_clip), at load time or on
the fly in the forward pass; training at a resolution drawn per step from a set or growing low -> high (RECLIP);
patch dropout.

Resizing is a linear map along each axis, so it is done with two small matrices, built once per (old, new) size with
PyTorch's interpolation weights: `antialias=True` is `F.interpolate(mode="bicubic", antialias=True)` (Keys' a = -0.5,
support widened when shrinking, as PIL), which open_clip's `resize_pos_embed` uses; `antialias=False` is plain
`mode="bicubic"` (a = -0.75, edges clamped). As matmuls they are differentiable and cheap inside a compiled step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from functools import lru_cache

import mlx.core as mx
import numpy as np

# ---- interpolation weights -----------------------------------------------------------------------------------------


def _keys(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _antialiased(n_in: int, n_out: int) -> np.ndarray:
    """torch's separable antialiased bicubic (UpSampleKernel.cpp `_compute_indices_weights_aa`)."""
    scale = n_in / n_out
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = _keys((np.arange(lo, hi) - center + 0.5) * stretch, -0.5)
        out[i, lo:hi] = w / w.sum()
    return out


def _bicubic(n_in: int, n_out: int) -> np.ndarray:
    """torch's plain bicubic (align_corners=False): 4 taps at a = -0.75, indices clamped to the edge."""
    scale = n_in / n_out
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        real = scale * (i + 0.5) - 0.5
        left = min(math.floor(real), n_in - 1)
        t = min(max(real - left, 0.0), 1.0)
        taps = _keys(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
        for k, w in enumerate(taps):
            out[i, min(max(left - 1 + k, 0), n_in - 1)] += w
    return out


@lru_cache(maxsize=None)
def resize_matrix(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
    """(n_out, n_in) float64: row i holds the weights of output sample i."""
    return _antialiased(n_in, n_out) if antialias else _bicubic(n_in, n_out)


@lru_cache(maxsize=None)
def _mx_matrix(n_in: int, n_out: int, antialias: bool) -> mx.array:
    # Cached per size: the compiled step sees the same constant each time it traces this shape.
    return mx.array(resize_matrix(n_in, n_out, antialias).astype(np.float32))


# ---- position embeddings -------------------------------------------------------------------------------------------


def resample_position_embedding(pos: mx.array, grid: tuple[int, int], antialias: bool = True) -> mx.array:
    """(1 + side*side, D) class + grid embeddings -> (1 + gh*gw, D): the class row kept, the grid resized in float32
    (open_clip's `resize_pos_embed`). Unchanged when the grid already matches."""
    n, dims = pos.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"position embedding of {n} rows is not a class token plus a square grid")
    gh, gw = grid
    if (gh, gw) == (side, side):
        return pos
    patches = pos[1:].astype(mx.float32).reshape(side, side * dims)
    rows = (_mx_matrix(side, gh, antialias) @ patches).reshape(gh, side, dims)  # resize the height: (gh, side, D)
    grid_out = _mx_matrix(side, gw, antialias) @ rows  # then the width: (gh, gw, D)
    return mx.concatenate([pos[:1], grid_out.reshape(gh * gw, dims).astype(pos.dtype)])


def resize_image_size(model, image_size: int, antialias: bool = True):
    """Make `model` a model for `image_size` px images: position embeddings resampled, config updated (so a saved
    model keeps the new size). The forward pass accepts other sizes anyway; this makes one of them native."""
    cfg = model.config.vision_config
    if image_size <= 0 or image_size % cfg.patch_size:
        raise ValueError(f"image size {image_size} must be a positive multiple of the patch size {cfg.patch_size}")
    grid = image_size // cfg.patch_size
    embedding = model.vision_model.embeddings.position_embedding
    embedding.weight = resample_position_embedding(embedding.weight, (grid, grid), antialias)
    cfg.image_size = image_size
    return model


# ---- patch dropout -------------------------------------------------------------------------------------------------


def drop_patches(x: mx.array, p: float) -> mx.array:
    """(B, 1 + N, D) -> (B, 1 + keep, D): the class token and a random max(1, int(N * (1 - p))) patch tokens per
    sample (open_clip's PatchDropout, arXiv:2212.00794). A static count, so the compiled step keeps one shape."""
    batch, n = x.shape[0], x.shape[1] - 1
    keep = max(1, int(n * (1 - p)))
    chosen = mx.argsort(mx.random.uniform(shape=(batch, n)), axis=-1)[:, :keep]  # a random subset per sample
    patches = mx.take_along_axis(x[:, 1:], chosen[:, :, None], axis=1)
    return mx.concatenate([x[:, :1], patches], axis=1)


def with_patch_dropout(step, model, p: float):
    """The step with patch dropout on while it runs (the compiled step reads the switch when it traces); evaluation,
    which calls the model outside the step, sees every patch."""
    if not p:
        return step
    if not 0 < p < 1:
        raise ValueError(f"--patch-dropout must be in [0, 1), got {p}")
    vision = model.vision_model

    def dropout_step(*batch):
        vision.patch_dropout = p
        try:
            return step(*batch)
        finally:
            vision.patch_dropout = 0.0

    return dropout_step


# ---- multi-resolution training -------------------------------------------------------------------------------------


def training_resolutions(args, vision_config) -> list[int]:
    """The sizes a run trains at: --resolutions, or [half, full] with --progressive-resolution alone; [] for one size."""
    patch, native = vision_config.patch_size, vision_config.image_size
    sizes = sorted({int(s) for s in args.resolutions.split(",") if s.strip()})
    if not sizes and args.progressive_resolution:
        sizes = sorted({max(patch, native // 2 // patch * patch), native})
    wrong = [s for s in sizes if s <= 0 or s % patch]
    if wrong:
        raise ValueError(f"--resolutions {wrong}: each must be a positive multiple of the patch size {patch}")
    return sizes if len(sizes) > 1 or (sizes and sizes[0] != native) else []


def resolution_at(step: int, sizes: list[int], total: int, progressive: bool, seed: int = 0) -> int:
    """The image size of 1-based `step`: equal phases from the smallest to the largest size (progressive), or a draw
    from `sizes` that depends only on (seed, step), so a resumed run draws the same."""
    if progressive:
        return sizes[min((step - 1) * len(sizes) // max(total, 1), len(sizes) - 1)]
    return sizes[int(np.random.default_rng([seed, step, 5]).integers(len(sizes)))]


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, C) -> (B, size, size, C) with the antialiased bicubic weights (PIL-like)."""
    _, h, w, _ = images.shape
    if (h, w) == (size, size):
        return images
    mh = resize_matrix(h, size).astype(np.float32)
    mw = resize_matrix(w, size).astype(np.float32)
    rows = np.einsum("oh,bhwc->bowc", mh, images, optimize=True)
    return np.einsum("pw,bowc->bopc", mw, rows, optimize=True).astype(np.float32)


def loader_preprocess(preprocess, sizes: list[int]):
    """The loader's transform: crops at the largest training size; each step's batch is then resized down."""
    return dataclasses.replace(preprocess, image_size=max(sizes)) if sizes else preprocess


def train_batches(batches, sizes: list[int], args, total: int, start: int):
    """Batches with images at each step's resolution: one size per batch, so the compiled step traces once per size."""
    if not sizes:
        return batches

    def resized():
        for step in itertools.count(start + 1):
            batch = next(batches)
            size = resolution_at(step, sizes, total, args.progressive_resolution, args.seed)
            yield {**batch, "images": resize_images(batch["images"], size)}

    return resized()
