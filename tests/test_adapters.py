"""Adapters (CLIP-Adapter, Tip-Adapter(-F), CoOp), domain presets and data statistics, on the `tiny` config and a tiny
synthetic set; formulas checked against numpy, reloads against the in-memory model."""

import json
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mlx_clip.cli import main  # first: preloads BLAS before mlx.core
from mlx_clip.adapters import (
    AdapterConfig, build_adapter, coop_prompt_ids, load_adapter, save_adapter, train_adapter,
)
from mlx_clip.config import get_config
from mlx_clip.data.images import decode_image
from mlx_clip.data.synth import synthesize
from mlx_clip.domains import PRESETS, channel_stats
from mlx_clip.io import load, save
from mlx_clip.model import CLIP, init_weights
from mlx_clip.serve import ServeConfig
from mlx_clip.serve.engine import Engine
from mlx_clip.train.adapt import encode_source
from mlx_clip.train.args import resolve_args
from mlx_clip.train.finetune import finetune

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

CLASSES = ["scratch", "hole", "stain", "crack", "no defect"]
TEMPLATES = ["a photo of {}.", "{} on a surface."]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return str(save(init_weights(CLIP(get_config("tiny")), 0), None, tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "industrial"
    synthesize("industrial", out, n=60, seed=0, image_size=32)
    return out


@pytest.fixture(scope="module")
def features(base_dir, data):
    clip, _, preprocess = load(base_dir)
    feats, labels, _ = encode_source(clip, preprocess, str(data / "train.csv"))
    return feats, labels


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_classifier(clip, tokenizer, classnames, templates):
    """Zero-shot weights from raw text embeddings: normalize each template's, mean per class, renormalize."""
    raw = np.array(clip.encode_text(tokenizer([t.format(c) for c in classnames for t in templates])))
    return unit(unit(raw).reshape(len(classnames), len(templates), -1).mean(axis=1))


def adapted(base_dir, method, feats=None, labels=None, **kw):
    clip, tokenizer, _ = load(base_dir)
    cfg = AdapterConfig(method=method, base_model=base_dir, classnames=CLASSES, templates=TEMPLATES, **kw)
    return build_adapter(clip, tokenizer, cfg, feats, labels), clip, tokenizer


def head_arrays(model):
    return {k: np.array(v) for k, v in model.adapter_weights().items()}


@pytest.mark.parametrize("method", ["clip-adapter", "tip-adapter", "coop"])
def test_train_save_reload_identical(method, base_dir, features, data, tmp_path):
    feats, labels = features
    model, clip, _ = adapted(base_dir, method, feats, labels)
    base_before = {k: np.array(v) for k, v in tree_flatten(clip.parameters())}
    init = head_arrays(model)
    losses = train_adapter(model, feats, labels, steps=8, batch_size=16, lr=1e-2, seed=0)
    assert len(losses) == 8 and np.isfinite(losses).all()
    trained = head_arrays(model)
    assert any(not np.array_equal(init[k], trained[k]) for k in trained), "training changed nothing"
    for k, v in tree_flatten(clip.parameters()):  # the towers stay frozen
        np.testing.assert_array_equal(np.array(v), base_before[k])
    out = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    saved = mx.load(str(out / "adapter.safetensors"))
    assert set(saved) == set(trained)  # only the adapter's arrays, never the base model's
    reloaded, _, preprocess = load_adapter(out)
    via_load = load(out)[0]  # mlx_clip.load on an adapter dir: the same wrapper
    np.testing.assert_array_equal(np.array(via_load.class_features()), np.array(reloaded.class_features()))
    images = mx.array(np.random.default_rng(1).standard_normal((3, 32, 32, 3)).astype(np.float32))
    np.testing.assert_allclose(np.array(reloaded.classify(images)), np.array(model.classify(images)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(reloaded.encode_image(images, normalize=True)),
                               np.array(model.encode_image(images, normalize=True)), rtol=0, atol=1e-6)
    # serve: the engine loads the adapter dir through mlx_clip.load and embeds with the adapted image features
    engine = Engine(ServeConfig(model=str(out), max_batch=2), lambda: load(out))
    engine._load_and_warm()
    np.testing.assert_allclose(engine._run("image", list(np.array(images))),
                               np.array(model.encode_image(images, normalize=True)), rtol=0, atol=1e-6)


def test_tip_adapter_training_free_matches_numpy(base_dir, features):
    feats, labels = features
    model, clip, tokenizer = adapted(base_dir, "tip-adapter", feats, labels, alpha=1.7, beta=4.0)
    images = mx.array(np.random.default_rng(2).standard_normal((4, 32, 32, 3)).astype(np.float32))
    f = unit(np.array(clip.encode_image(images)))
    keys, onehot = unit(feats), np.eye(len(CLASSES))[labels]
    scale = np.exp(float(clip.logit_scale.item()))
    expected = scale * f @ numpy_classifier(clip, tokenizer, CLASSES, TEMPLATES).T \
        + 1.7 * np.exp(-4.0 * (1 - f @ keys.T)) @ onehot
    np.testing.assert_allclose(np.array(model.classify(images)), expected, rtol=1e-4, atol=1e-4)


def test_clip_adapter_matches_numpy(base_dir):
    model, clip, tokenizer = adapted(base_dir, "clip-adapter", ratio=0.3)
    images = mx.array(np.random.default_rng(3).standard_normal((4, 32, 32, 3)).astype(np.float32))
    f = unit(np.array(clip.encode_image(images)))
    w1, w2 = np.array(model.head.fc1.weight), np.array(model.head.fc2.weight)
    adapted_f = unit(0.3 * np.maximum(np.maximum(f @ w1.T, 0) @ w2.T, 0) + 0.7 * f)
    expected = np.exp(float(clip.logit_scale.item())) * adapted_f @ numpy_classifier(clip, tokenizer, CLASSES, TEMPLATES).T
    np.testing.assert_allclose(np.array(model.classify(images)), expected, rtol=1e-4, atol=1e-4)


def test_coop_only_context_trains_and_starts_at_the_prompt(base_dir):
    model, clip, tokenizer = adapted(base_dir, "coop", ctx_init="a photo of a")
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == ["head.ctx"]
    assert model.head.ctx.shape == (4, clip.config.text_config.hidden_size)
    # With the context at its initial words, the spliced prompt is exactly the plain prompt through the text tower.
    ids, n_ctx = coop_prompt_ids(tokenizer, CLASSES, "a photo of a")
    assert n_ctx == 4
    plain = unit(np.array(clip.encode_text(mx.array(ids))))
    np.testing.assert_allclose(np.array(model.class_features()), plain, rtol=1e-5, atol=1e-5)


def test_finetune_entry_and_cli(base_dir, data, tmp_path):
    summary = finetune(resolve_args({"model": base_dir, "adapter": "tip-adapter", "train_data": str(data / "train.csv"),
                                     "val_data": str(data / "val.csv"), "out": str(tmp_path / "tip")}), quiet=True)
    assert summary["steps"] == 0 and summary["trainable_params"] == 0 and 0 <= summary["top1_after"] <= 1
    assert (tmp_path / "tip" / "adapter" / "adapter_config.json").is_file()
    result = CliRunner().invoke(main, ["finetune", "--model", base_dir, "--adapter", "coop", "--steps", "2",
                                       "--train-data", str(data / "train.csv"), "--out", str(tmp_path / "coop")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "coop" / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "coop" and config["classnames"] == CLASSES


def test_presets_fill_defaults_but_flags_and_yaml_win(tmp_path):
    preset = PRESETS["industrial"].training_defaults()
    args = resolve_args({"domain": "industrial"})
    assert (args.lr, args.loss, args.hflip, args.augment_scale, args.adapter) == \
        (preset["lr"], preset["loss"], True, preset["augment_scale"], "full")
    assert resolve_args({"domain": "medical"}).hflip is False  # laterality
    assert resolve_args({"domain": "scientific"}).hflip is False  # charts: a flip reverses a trend
    args = resolve_args({"domain": "industrial", "lr": 3e-5, "hflip": False})
    assert (args.lr, args.hflip) == (3e-5, False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"loss": "clip", "epochs": 7}))
    args = resolve_args({"domain": "industrial", "epochs": 2}, str(config))
    assert (args.loss, args.epochs) == ("clip", 2)
    assert resolve_args({}).lr == 1e-5 and resolve_args({}).domain == ""  # no preset: the plain defaults
    assert resolve_args({"adapter": "lit"}).lock_image is True
    coop = resolve_args({"domain": "medical", "adapter": "coop"})  # a feature method keeps only the augmentation
    assert coop.loss == "clip" and coop.augment_scale == PRESETS["medical"].augmentation.crop_scale
    with pytest.raises(ValueError):
        resolve_args({"domain": "astronomy"})


def test_channel_stats_match_numpy_and_cli(data, tmp_path):
    files = sorted((data / "images" / "train").glob("*.png"))[:10]
    pixels = np.concatenate([np.asarray(decode_image(f), np.float64).reshape(-1, 3) / 255 for f in files])
    stats = channel_stats([{"image": str(f)} for f in files])
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), rtol=1e-6)
    out = tmp_path / "stats.json"
    result = CliRunner().invoke(main, ["data", "stats", "--data", str(data / "train.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["images"] == 48


def test_dicom_without_pydicom_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the 'dicom' extra were not installed
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(ImportError, match="pydicom"):
        decode_image(str(path))
    Image.new("L", (4, 4)).save(tmp_path / "plain.png")  # other formats never need it
    assert decode_image(str(tmp_path / "plain.png")).mode == "RGB"


def write_dicom(path, pixels, slope, intercept, centre, width):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = slope, intercept, centre, width
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_is_windowed_to_16_bit(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 4096, (8, 6))
    write_dicom(tmp_path / "scan.dcm", pixels, 1, -1024, 40, 400)
    img = decode_image(str(tmp_path / "scan.dcm"), mode=None)
    hu = pixels * 1.0 - 1024
    expected = np.rint(np.clip((hu - (40 - 200)) / 400, 0, 1) * 65535)
    assert img.mode == "I;16" and img.size == (6, 8)
    np.testing.assert_array_equal(np.asarray(img, np.float64), expected)
    assert decode_image(str(tmp_path / "scan.dcm")).mode == "RGB"  # and on to 8-bit RGB like any 16-bit scan


def test_normalize_from_data_saves_the_data_stats(base_dir, data, tmp_path):
    from mlx_clip.data.sources import open_source

    summary = finetune(resolve_args({"model": base_dir, "train_data": str(data / "train.csv"), "domain": "industrial",
                                     "steps": 1, "batch_size": 8, "normalize_from_data": True,
                                     "out": str(tmp_path / "run")}), quiet=True)
    expected = channel_stats(open_source(data / "train.csv").records)
    saved = json.loads((tmp_path / "run" / "final" / "preprocessor_config.json").read_text())
    np.testing.assert_allclose(saved["image_mean"], expected["mean"], rtol=1e-6)
    np.testing.assert_allclose(saved["image_std"], expected["std"], rtol=1e-6)
    assert summary["steps"] == 1


def test_rotate90_rotates_the_same_crop(base_dir, data):
    from mlx_clip.data.pipeline import Loader, LoaderConfig
    from mlx_clip.data.sources import open_source

    records = open_source(data / "train.csv").records[:12]
    preprocess = load(base_dir)[2]
    plain, rotated = (next(iter(Loader(records, preprocess, LoaderConfig(batch_size=12, seed=3, rotate90=r,
                                                                           num_threads=1))))["images"]
                      for r in (False, True))
    quarters = []
    for a, b in zip(plain, rotated):  # images are (H, W, C); PIL's ROTATE_90 is counter-clockwise, as np.rot90
        matches = [k for k in range(4) if np.allclose(np.rot90(a, k, axes=(0, 1)), b, atol=1e-6)]
        assert matches, "a rotate90 sample is not a 90-degree rotation of the same crop"
        quarters.append(matches[0])
    assert len(set(quarters)) > 1
