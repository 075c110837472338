"""Preprocessing parity with open_clip's eval transform (torchvision on PIL), high-depth inputs, HF config I/O."""

import json

from mlx_clip.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess  # before mlx.core: loads the BLAS

import mlx.core as mx
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize

# (width, height): 1-pixel-wide/tall, odd, smaller and larger than the crop, portrait and landscape, exact size.
SIZES = [(1, 17), (23, 1), (1, 1), (7, 5), (31, 64), (64, 31), (33, 33), (100, 37), (250, 300), (32, 32), (64, 64)]
MODES_8BIT = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1"]


def random_image(rng, mode, w, h):
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "P":  # a real palette: quantize, whose palette[0] is not black
        return rgba.convert("RGB").quantize(colors=16)
    return rgba.convert(mode)


def reference(img, image_size, **kwargs):
    """open_clip's eval transform, CHW torch -> HWC numpy."""
    x = open_clip.image_transform(image_size, is_train=False, **kwargs)(img)
    return x.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("image_size", [32, 64, 224, 336])
@pytest.mark.parametrize("mode", MODES_8BIT)
def test_matches_open_clip_8bit(mode, image_size):
    rng = np.random.default_rng([image_size, MODES_8BIT.index(mode)])
    pre = Preprocess(image_size)
    sizes = SIZES if image_size <= 64 else SIZES[::3]  # the big crops are slow on 1-pixel-wide inputs
    for w, h in sizes:
        img = random_image(rng, mode, w, h)
        ours = pre.to_numpy(img)
        assert ours.shape == (image_size, image_size, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference(img, image_size), rtol=0, atol=1e-5, err_msg=f"{mode} {w}x{h}")


@pytest.mark.parametrize("mode", ["RGB", "LA", "P"])
def test_matches_open_clip_squash_bilinear_custom_stats(mode):
    rng = np.random.default_rng(7)
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    cases = [dict(resize_mode="squash"), dict(interpolation="bilinear"),
             dict(mean=mean, std=std), dict(resize_mode="squash", interpolation="bilinear", mean=mean, std=std)]
    for kwargs in cases:
        pre = Preprocess(48, **kwargs)
        for w, h in SIZES:
            img = random_image(rng, mode, w, h)
            np.testing.assert_allclose(pre.to_numpy(img), reference(img, 48, **kwargs), rtol=0, atol=1e-5,
                                       err_msg=f"{kwargs} {w}x{h}")


def high_depth(v, mode):
    """The 8-bit image `v` as a `mode` image at that mode's full range (257 * v spans 0..65535 exactly)."""
    if mode == "F":
        return Image.fromarray(v.astype(np.float32))
    if mode == "I":
        return Image.fromarray(v.astype(np.int32) * 257)
    order = "<u2" if mode == "I;16" else ">u2"
    return Image.frombytes(mode, (v.shape[1], v.shape[0]), (v.astype(np.uint16) * 257).astype(order).tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_high_depth_matches_8bit_gray(mode):
    # Our float resize differs from PIL's 8-bit one only in rounding to uint8 after each of its two separable
    # passes: <= 0.5 level after the horizontal pass, amplified by the vertical kernel's sum |w| (<= ~1.27 for PIL's
    # normalized bicubic/bilinear weights, so 1.3), plus <= 0.5 after the vertical pass; clamping is 1-Lipschitz.
    tol = (0.5 * 1.3 + 0.5) / 255 / min(OPENAI_STD)
    rng = np.random.default_rng(3)
    for image_size in (32, 64):
        pre = Preprocess(image_size)
        for w, h in SIZES:
            v = rng.integers(0, 256, (h, w), dtype=np.uint8)
            img = high_depth(v, mode)
            assert img.mode == mode
            ours, gray = pre.to_numpy(img), pre.to_numpy(Image.fromarray(v))
            np.testing.assert_allclose(ours, gray, rtol=0, atol=tol, err_msg=f"{w}x{h}")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_gradient_keeps_precision(mode):
    ramp = np.linspace(0, 65535, 96 * 96).round().reshape(96, 96)  # smooth, so bicubic stays inside 0..65535
    order = {"I;16": "<u2", "I;16B": ">u2"}.get(mode)
    img = (Image.fromarray(ramp.astype(np.int32)) if mode == "I"
           else Image.frombytes(mode, (96, 96), ramp.astype(order).tobytes()))
    x = Preprocess(64).to_numpy(img)
    gray = x[..., 1] * OPENAI_STD[1] + OPENAI_MEAN[1]  # back to 0..1
    assert np.allclose(x[..., 0] * OPENAI_STD[0] + OPENAI_MEAN[0], gray, atol=1e-5)  # channels replicated
    assert len(np.unique(np.round(gray * 65535))) > 256  # PIL's convert("RGB") would leave <= 256
    assert len(np.unique(np.asarray(img.convert("RGB")))) <= 256


def test_call_batch_and_normalize_array():
    rng = np.random.default_rng(5)
    pre = Preprocess(32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    images = [random_image(rng, "RGB", w, h) for w, h in SIZES[:4]]
    batch = pre.batch(images)
    assert isinstance(batch, mx.array) and batch.shape == (4, 32, 32, 3) and batch.dtype == mx.float32
    for img, row in zip(images, np.array(batch)):
        np.testing.assert_array_equal(row, pre.to_numpy(img))
        np.testing.assert_array_equal(np.array(pre(img)), row)

    pixels = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)  # (..., H, W, 3)
    norm = Normalize(pre.mean, pre.std)
    expected = norm(torch.from_numpy(pixels).float().div(255).movedim(-1, -3)).movedim(-3, -1).numpy()
    for x in (pixels, pixels.astype(np.float32) / 255, mx.array(pixels), mx.array(pixels.astype(np.float32) / 255)):
        out = pre.normalize_array(x)
        assert isinstance(out, type(x)) and out.shape == pixels.shape and out.dtype in (np.float32, mx.float32)
        np.testing.assert_allclose(np.array(out), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(image_size=336, interpolation="bilinear"),
                                    dict(image_size=64, resize_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)])
def test_save_loads_in_transformers_and_round_trips(tmp_path, kwargs):
    from transformers import CLIPImageProcessor

    pre = Preprocess(**kwargs)
    pre.save(tmp_path)
    hf = CLIPImageProcessor.from_pretrained(tmp_path)
    assert (hf.crop_size["height"], hf.crop_size["width"]) == (pre.image_size, pre.image_size)
    np.testing.assert_allclose(hf.image_mean, pre.mean)
    np.testing.assert_allclose(hf.image_std, pre.std)
    assert int(hf.resample) == {"bicubic": 3, "bilinear": 2}[pre.interpolation]
    assert Preprocess.from_dir(tmp_path) == pre
    assert Preprocess.from_hf_dict(hf.to_dict()) == pre  # what transformers writes back is read too


def test_from_dir_defaults_and_hf_configs(tmp_path):
    assert Preprocess.from_dir(tmp_path / "missing", image_size=336) == Preprocess(336)
    # The layout of openai/clip-vit-large-patch14-336's file (older int crop_size / size forms too).
    d = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
         "image_std": list(OPENAI_STD), "size": 336}
    assert Preprocess.from_hf_dict(d) == Preprocess(336)
    assert Preprocess.from_hf_dict({"image_mean": 0.5, "image_std": 0.5}) == Preprocess(mean=(0.5,) * 3,
                                                                                         std=(0.5,) * 3)
    assert Preprocess.from_hf_dict({"do_normalize": False}).normalize_array(np.full((1, 1, 3), 255, np.uint8)).min() == 1


@pytest.mark.parametrize("bad, field", [
    ({"crop_size": {"height": 224, "width": 200}}, "crop_size"),
    ({"crop_size": "224"}, "crop_size"),
    ({"size": {"shortest_edge": 256}}, "crop_size"),  # resize 256 then crop 224: not open_clip's transform
    ({"size": {"shortest_edge": 0}}, "size"),
    ({"size": {"height": 64, "width": 32}}, "size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": ["a", 1, 1]}, "image_std"),
    ({"resample": 1}, "resample"),
    ({"do_center_crop": False}, "do_center_crop"),
    ({"rescale_factor": 1.0}, "rescale_factor"),
])
def test_malformed_config_names_file_and_field(tmp_path, bad, field):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"preprocessor_config\.json.*'{field}'"):
        Preprocess.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"preprocessor_config\.json"):
        Preprocess.from_dir(tmp_path)
