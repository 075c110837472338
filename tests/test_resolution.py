"""Multi-resolution: position embeddings resampled as open_clip does (at load and on the fly), training at several
sizes without retracing every step, resolution schedules and patch dropout. References: open_clip's resize_pos_embed,
timm's resample_abs_pos_embed, torch's F.interpolate, the unsliced embedding rows."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from timm.layers import resample_abs_pos_embed

import mlx_clip.train.finetune as ft
from converters.convert import init_model
from mlx_clip.config import get_config
from mlx_clip.data.synth import synthesize
from mlx_clip.io import load, save
from mlx_clip.memory import build_train_step, synthetic_batch
from mlx_clip.model import CLIP
from mlx_clip.resolution import (drop_patches, resample_position_embedding, resize_images, resolution_at,
                                 training_resolutions)
from mlx_clip.train.args import TrainingArgs, resolve_args
from mlx_clip.train.optim import build_optimizer
from mlx_clip.train.step import make_loss_fn


def _open_clip_resized(pos: np.ndarray, grid: int) -> np.ndarray:
    state = {"visual.positional_embedding": torch.tensor(pos)}
    resize_pos_embed(state, SimpleNamespace(visual=SimpleNamespace(grid_size=(grid, grid))))
    return state["visual.positional_embedding"].numpy()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 0, tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("grid", [3, 5, 7, 10, 16])
def test_resample_equals_open_clip_resize_pos_embed(grid):
    pos = np.random.default_rng(grid).standard_normal((1 + 7 * 7, 24)).astype(np.float32)
    mine = np.array(resample_position_embedding(mx.array(pos), (grid, grid)))
    np.testing.assert_allclose(mine, _open_clip_resized(pos, grid), rtol=0, atol=1e-5)


@pytest.mark.parametrize("grid", [(5, 5), (10, 10), (4, 9)])
def test_resample_without_antialias_equals_timm(grid):
    pos = np.random.default_rng(1).standard_normal((1 + 7 * 7, 24)).astype(np.float32)
    mine = np.array(resample_position_embedding(mx.array(pos), grid, antialias=False))
    ref = resample_abs_pos_embed(torch.tensor(pos)[None], list(grid), antialias=False)[0].numpy()
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5)


def test_resize_images_equals_torch_antialiased_bicubic():
    images = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
    for size in (24, 56):
        ref = F.interpolate(torch.tensor(images).permute(0, 3, 1, 2), size=(size, size), mode="bicubic",
                            antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(resize_images(images, size), ref, rtol=1e-5, atol=1e-5)  # torch: fp32 weights


def test_load_at_another_size_and_run_at_any_size(tiny_dir, tmp_path):
    model, _, _ = load(tiny_dir)
    pos = np.array(model.vision_model.embeddings.position_embedding.weight)
    resized, _, preprocess = load(tiny_dir, image_size=48)
    assert resized.config.vision_config.image_size == 48 and preprocess.image_size == 48
    np.testing.assert_allclose(np.array(resized.vision_model.embeddings.position_embedding.weight),
                               _open_clip_resized(pos, 6), rtol=0, atol=1e-5)
    images = mx.array(np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32))
    # on the fly: the 32 px model given 48 px images resamples its grid as the load did
    np.testing.assert_allclose(np.array(model.encode_image(images)), np.array(resized.encode_image(images)),
                               rtol=1e-5, atol=1e-6)
    save(resized, None, tmp_path / "m48", preprocess)
    again, _, again_pre = load(tmp_path / "m48")
    assert again.config.vision_config.image_size == 48 and again_pre.image_size == 48
    np.testing.assert_array_equal(np.array(again.encode_image(images)), np.array(resized.encode_image(images)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load(tiny_dir, image_size=44)


def _counting_loss(traces: list, text_lengths: list | None = None):
    base = make_loss_fn("clip")
    text_lengths = [] if text_lengths is None else text_lengths

    def loss_fn(model, images, ids, labels):  # Python runs only when the compiled step traces
        traces.append((images.shape[1], model.vision_model.patch_dropout))
        # trimmed rows: their length; packed rows (CPU training, tokenizer.pack_rows): the packed length, a 32-multiple
        text_lengths.append(ids.shape[1] if not isinstance(ids, dict) else ("packed", ids["ids"].shape[1]))
        return base(model, images, ids, labels)

    loss_fn.feature_loss = base.feature_loss
    return loss_fn


def test_steps_at_alternating_sizes_trace_once_per_size():
    mx.random.seed(0)
    model = CLIP(get_config("tiny"))
    args = TrainingArgs(lr=1e-3)
    optimizer = build_optimizer(model, args, 8)
    traces = []
    step = build_train_step(model, optimizer, _counting_loss(traces), args)
    for i, size in enumerate([24, 32, 24, 32, 40, 24, 32, 40]):
        mx.eval(step(*synthetic_batch(model.config, 4, size, i)), model.state, optimizer.state)
    assert sorted(traces) == [(24, 0.0), (32, 0.0), (40, 0.0)]


def test_finetune_at_two_resolutions_with_patch_dropout(tiny_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    synthesize("industrial", data, n=40, seed=0, image_size=32)
    traces, text_lengths = [], []
    monkeypatch.setattr(ft, "make_loss_fn", lambda *a, **k: _counting_loss(traces, text_lengths))
    args = resolve_args(dict(model=str(tiny_dir), train_data=str(data / "train.csv"), out=str(tmp_path / "run"),
                             steps=8, batch_size=8, lr=1e-3, log_every=4, workers=1, prefetch=1, resolutions="24,32",
                             patch_dropout=0.5, image_size=40))
    summary = ft.finetune(args, quiet=True)
    # Both sizes trained; a trace per (image size, caption bucket) that occurred, none twice: not one per step. (The
    # caption bucket is the batch's trimmed text length, tokenizer.trim_padding, or its packed length in multiples of
    # 32 tokens, tokenizer.pack_rows: a few values, each traced once.)
    shapes = list(zip(traces, text_lengths))
    assert {size for size, _ in traces} == {24, 32} and all(drop == 0.5 for _, drop in traces)
    assert len(shapes) == len(set(shapes)) < 8
    assert all(t in {16, 32, 48, 64, 77} if isinstance(t, int) else t[1] % 32 == 0 for t in text_lengths)
    drawn = {resolution_at(s, [24, 32], 8, False, args.seed) for s in range(1, 9)}
    assert drawn == {24, 32}
    final, _, preprocess = load(summary["final_model"])
    assert final.config.vision_config.image_size == 40 and preprocess.image_size == 40  # --image-size is saved
    assert final.vision_model.patch_dropout == 0.0
    records = [json.loads(line) for line in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 8]


def test_resolution_schedules():
    sizes = [32, 48, 64]
    progressive = [resolution_at(s, sizes, 9, True) for s in range(1, 10)]
    assert progressive == [32] * 3 + [48] * 3 + [64] * 3
    drawn = [resolution_at(s, sizes, 9, False, seed=3) for s in range(1, 200)]
    assert set(drawn) == set(sizes) and drawn == [resolution_at(s, sizes, 9, False, seed=3) for s in range(1, 200)]
    vision = get_config("small").vision_config  # 64 px, patch 8
    args = TrainingArgs(resolutions="", progressive_resolution=True)
    assert training_resolutions(args, vision) == [32, 64]
    assert training_resolutions(TrainingArgs(resolutions="64"), vision) == []  # the model's own size only
    with pytest.raises(ValueError, match="multiple of the patch size"):
        training_resolutions(TrainingArgs(resolutions="48,60"), vision)


def test_patch_dropout_keeps_the_class_token_and_a_random_subset():
    mx.random.seed(0)
    x = mx.random.normal((3, 1 + 16, 8))
    out = np.array(drop_patches(x, 0.5))
    assert out.shape == (3, 1 + 8, 8)
    x = np.array(x)
    for b in range(3):
        assert np.array_equal(out[b, 0], x[b, 0])
        rows = [int(np.flatnonzero((x[b, 1:] == row).all(1))[0]) for row in out[b, 1:]]  # each a patch of sample b
        assert len(set(rows)) == 8
    assert not np.array_equal(out[0, 1:], out[1, 1:])  # drawn per sample
