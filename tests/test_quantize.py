"""Quantized models: which layers are quantized (and which stay float), the packed weights unpacked in numpy lie within
one quantization step of the float ones, embeddings stay close to fp32 (cosine), and `convert --quantize` -> `load`
gives exactly the in-memory quantized model; embed and eval run on the result."""

import json

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_clip.data import synthesize_generic
from mlx_clip.eval import evaluate
from mlx_clip.io import load
from mlx_clip.quantize import quantization_of, quantize, quantized_layers
from cli_util import invoke, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory, seed=2)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A few synthetic generic-shape images and captions (the builtin model's own domain)."""
    return synthesize_generic(tmp_path_factory.mktemp("s"), n=60, seed=7)["out_dir"]


def _inputs(seed=0, image_size=32, n=6):
    rng = np.random.default_rng(seed)
    texts = ["a photo of a red circle", "two blue squares", "a striped triangle on a green background",
             "one small star", "three large crosses", "a grayscale image of a circle"][:n]
    return mx.array(rng.normal(size=(n, image_size, image_size, 3)).astype(np.float32)), texts


def _embed(model, tok, images, texts):
    return np.array(model.encode_image(images, normalize=True)), np.array(model.encode_text(tok(texts), normalize=True))


def _cosines(a, b):
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """MLX's affine packing, read independently: each uint32 holds 32/bits values, lowest bits first."""
    shifts = np.arange(32 // bits, dtype=np.uint32) * bits
    values = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1).astype(np.float64)


def test_policy_encoder_linears_only_and_indivisible_layers_stay_float(tiny_dir):
    model, _, _ = load(tiny_dir)
    encoder_linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in p]
    quantize(model, bits=8, group_size=64)
    assert sorted(quantized_layers(model)) == sorted(encoder_linears) and len(encoder_linears) == 24
    assert isinstance(model.visual_projection, nn.Linear) and isinstance(model.text_projection, nn.Linear)
    assert not isinstance(model.visual_projection, nn.QuantizedLinear)
    floats = dict(nn.utils.tree_flatten(model.parameters()))
    for name in ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight",
                 "vision_model.post_layernorm.weight", "text_model.encoder.layers.0.layer_norm1.weight"):
        assert floats[name].dtype == mx.float32, name
    assert quantization_of(model) == {"bits": 8, "group_size": 64, "mode": "affine"}

    # tiny's widths are 64 (q/k/v/out, fc1 inputs) and 256 (fc2 input): with groups of 128 only fc2 divides.
    model, _, _ = load(tiny_dir)
    quantize(model, bits=4, group_size=128)
    assert sorted(quantized_layers(model)) == sorted(p for p in encoder_linears if p.endswith("fc2"))
    images, texts = _inputs()
    model(images, load(tiny_dir)[1](texts))  # runs: no layer was given a width MLX refuses
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, 8, 64)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(load(tiny_dir)[0], bits=3)


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_weights_are_within_one_step(tiny_dir, bits):
    model, _, _ = load(tiny_dir)
    before = {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}
    quantize(model, bits=bits, group_size=32)
    for path in quantized_layers(model):
        layer = model
        for part in path.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        w = before[f"{path}.weight"].astype(np.float64)
        q = _unpack(np.array(layer.weight), bits)
        assert q.shape == w.shape and q.max() <= 2**bits - 1
        scales, biases = np.array(layer.scales, np.float64), np.array(layer.biases, np.float64)
        deq = (q.reshape(*scales.shape, 32) * scales[..., None] + biases[..., None]).reshape(w.shape)
        step = np.repeat(np.abs(scales), 32, axis=-1)  # MLX may store a negative scale (bias at the max)
        # Within one step (MLX makes the group's edge value exact, so rounding can exceed half a step), and on
        # average about a quarter step, as uniform rounding error is.
        err = np.abs(deq - w) / step
        assert err.max() <= 1.0 + 1e-3 and 0.15 < err.mean() < 0.35, (path, err.max(), err.mean())
        np.testing.assert_allclose(deq, np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, 32, bits)),
                                   atol=1e-6)


def test_builtin_8bit_keeps_cosine_to_fp32(shapes):
    from mlx_clip.eval import encode_images
    from mlx_clip.data import open_source

    records = list(open_source(f"{shapes}/train.csv"))[:16]
    model, tok, pre = load("builtin")
    texts = [r["caption"] for r in records]
    ref_images = encode_images(model, pre, [r["image"] for r in records])
    ref_texts = np.array(model.encode_text(tok(texts), normalize=True))
    stats = {}
    for bits in (8, 4):
        model, tok, pre = load("builtin")
        quantize(model, bits=bits, group_size=64)
        stats[bits] = (_cosines(encode_images(model, pre, [r["image"] for r in records]), ref_images).mean(),
                       _cosines(np.array(model.encode_text(tok(texts), normalize=True)), ref_texts).mean())
    print(f"\nbuiltin mean cosine to fp32 (images, texts): 8-bit {stats[8]}, 4-bit {stats[4]}")
    assert min(stats[8]) >= 0.99
    assert min(stats[4]) >= 0.9 and min(stats[4]) < min(stats[8])  # 4 bits: further, but still the same model


def test_convert_quantize_round_trip_and_use(tiny_dir, tmp_path, shapes):
    images, texts = _inputs()
    float_model, tok, _ = load(tiny_dir)
    ref = _embed(float_model, tok, images, texts)
    for bits, group in ((8, 64), (4, 128)):
        out = tmp_path / f"q{bits}"
        invoke("convert", "--from", "hf", "--checkpoint", tiny_dir, "--out", out, "--quantize", bits,
                "--group-size", group)
        assert json.loads((out / "config.json").read_text())["quantization"] == {
            "bits": bits, "group_size": group, "mode": "affine"}
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
        in_memory = quantize(load(tiny_dir)[0], bits, group)
        loaded, tok2, _ = load(out)
        assert sorted(quantized_layers(loaded)) == sorted(quantized_layers(in_memory))
        for a, b in zip(_embed(loaded, tok2, images, texts), _embed(in_memory, tok, images, texts)):
            np.testing.assert_array_equal(a, b)
        cosine = np.mean([_cosines(a, b).mean() for a, b in zip(_embed(loaded, tok2, images, texts), ref)])
        assert cosine >= (0.99 if bits == 8 else 0.9), cosine
    assert (tmp_path / "q4" / "model.safetensors").stat().st_size < (tiny_dir / "model.safetensors").stat().st_size

    # The quantized dir works where a model dir is expected: embed --data, and eval.
    invoke("embed", "--model", tmp_path / "q8", "--data", f"{shapes}/test.csv", "--out", tmp_path / "emb",
            "--shard-size", 4)
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["rows"] == 6
    result = evaluate(str(tmp_path / "q8"), f"{shapes}/test.csv")
    assert result["n"] == 6 and 0.0 <= result["top1"] <= 1.0
