"""mlx_clip/io.py: model dirs in and out — sanitize idempotence, byte-stable saves, atomic saves, and bad dirs refused
with an error that names the file or key. The weights reference is numpy/torch; the HF dirs come from transformers."""

import json
import os
import pickle
import struct

import mlx_clip  # noqa: F401  (before mlx.core: preloads the fast BLAS)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers

import mlx_clip.io as mio
from converters.convert import init_model
from converters.safety import CheckpointError
from mlx_clip.config import ConfigError, get_config
from mlx_clip.model import CLIP


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return init_model("tiny", 5, tmp_path_factory.mktemp("m") / "tiny")


def _params(model) -> dict:
    return dict(nn.utils.tree_flatten(model.parameters()))


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- sanitize, load/save stability ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["OIHW", "OHWI"])
def test_sanitize_is_idempotent(tiny_dir, layout):
    model = CLIP(get_config("tiny"))
    weights = dict(mx.load(str(tiny_dir / "model.safetensors")))
    ohwi = weights["vision_model.embeddings.patch_embedding.weight"]
    assert ohwi.shape == (64, 8, 8, 3)
    if layout == "OIHW":  # as torch stores it
        key = "vision_model.embeddings.patch_embedding.weight"
        weights[key] = mx.array(np.array(ohwi).transpose(0, 3, 1, 2))
        weights["logit_scale"] = weights["logit_scale"].reshape(1)  # some exports keep a 1-element logit_scale
        weights["text_model.embeddings.position_ids"] = mx.arange(77)[None]  # a buffer in old HF checkpoints
    once = model.sanitize(weights)
    _assert_same(model.sanitize(once), once)
    # Either layout lands on the same MLX arrays.
    _assert_same(once, dict(mx.load(str(tiny_dir / "model.safetensors"))))


def test_load_save_load_is_stable(tiny_dir, tmp_path):
    model, tok, pre = mio.load(tiny_dir)
    mio.save(model, tok, tmp_path / "a", pre)
    again, tok2, pre2 = mio.load(tmp_path / "a")
    _assert_same(_params(again), _params(model))
    mio.save(again, tok2, tmp_path / "b", pre2)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_hf_dir_load_save_load(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=498, eos_token_id=499),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8), projection_dim=16)
    hf = transformers.CLIPModel(cfg)
    hf.save_pretrained(tmp_path / "hf")
    model, tok, pre = mio.load(tmp_path / "hf")
    conv = np.array(model.vision_model.embeddings.patch_embedding.weight)
    ref = hf.vision_model.embeddings.patch_embedding.weight.detach().numpy()
    np.testing.assert_array_equal(conv, ref.transpose(0, 2, 3, 1))  # OIHW -> OHWI, checked against torch
    mio.save(model, tok, tmp_path / "a", pre)
    again, tok2, pre2 = mio.load(tmp_path / "a")
    _assert_same(_params(again), _params(model))
    mio.save(again, tok2, tmp_path / "b", pre2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# --- save atomicity ----------------------------------------------------------------------------------------------------


def test_failed_save_leaves_previous_dir_intact(tiny_dir, tmp_path, monkeypatch):
    out = _copy_dir(tiny_dir, tmp_path / "model")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    model, tok, pre = mio.load(tiny_dir)

    def write_half_then_fail(path, arrays, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a truncated file, as a crash mid-write leaves
        raise OSError("disk full")

    monkeypatch.setattr(mio.mx, "save_safetensors", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        mio.save(model, tok, out, pre)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left beside it
    monkeypatch.undo()
    mio.load(out)  # still a loadable model dir


def test_save_replaces_an_existing_dir_whole(tiny_dir, tmp_path):
    out = _copy_dir(tiny_dir, tmp_path / "model")
    (out / "stale.txt").write_text("from an older save")
    model, tok, pre = mio.load(tiny_dir)
    mio.save(mio.cast(model, "float16"), tok, out, pre)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert mio.load(out)[0].text_projection.weight.dtype == mx.float16


# --- bad dirs -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text_config": {}}), "vision_config"),
    (json.dumps({"text_config": {}, "vision_config": {"hidden_size": 70, "num_attention_heads": 12}}),
     "hidden_size 70 is not divisible by num_attention_heads 12"),
    (json.dumps({"text_config": {"hidden_act": "relu"}, "vision_config": {}}), "hidden_act"),
], ids=["not-json", "no-vision", "heads", "act"])
def test_bad_config_names_the_file(tiny_dir, tmp_path, text, match):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        mio.load(d)
    assert str(d / "config.json") in str(err.value)


def _with_weights(tiny_dir, tmp_path, edit):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    weights = dict(mx.load(str(d / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(d / "model.safetensors"), weights)
    return d


@pytest.mark.parametrize("edit,names", [
    (lambda w: w.pop("text_model.final_layer_norm.bias"), ["missing keys", "text_model.final_layer_norm.bias"]),
    (lambda w: w.update({"vision_model.head.weight": mx.zeros((2,))}), ["unexpected keys", "vision_model.head.weight"]),
    (lambda w: w.update({"visual_projection.weight": mx.zeros((32, 65))}),
     ["shape mismatches", "visual_projection.weight", "(32, 65)", "(32, 64)"]),
], ids=["missing", "extra", "shape"])
def test_bad_weights_in_a_model_dir_are_named(tiny_dir, tmp_path, edit, names):
    d = _with_weights(tiny_dir, tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        mio.load(d)
    for name in names:
        assert name in str(err.value)


def test_weights_saved_by_mlx_without_metadata_load(tiny_dir, tmp_path):
    # `mx.save_safetensors` without metadata writes "__metadata__": null, which the safetensors crate accepts.
    d = _with_weights(tiny_dir, tmp_path, lambda w: None)
    assert b'"__metadata__":null' in (d / "model.safetensors").read_bytes()[:200]
    _assert_same(_params(mio.load(d)[0]), _params(mio.load(tiny_dir)[0]))


def test_symlink_outside_the_dir_is_refused(tiny_dir, tmp_path):
    inside = _copy_dir(tiny_dir, tmp_path / "inside")
    (inside / "model.safetensors").rename(inside / "weights.bin.real")
    (inside / "model.safetensors").symlink_to("weights.bin.real")  # control: a link that stays inside loads
    mio.load(inside)
    outside = _copy_dir(tiny_dir, tmp_path / "outside")
    (outside / "model.safetensors").unlink()
    (outside / "model.safetensors").symlink_to(tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the model dir"):
        mio.load(outside)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_hf_dir_is_refused(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir, tmp_path / "hf")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"logit_scale": torch.zeros(()), "x": _Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        mio.load(d)
    assert not marker.exists()


def _header_file(path, header: dict, data=b"", length=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize("kind", ["oversized-length", "offsets-out-of-range", "overlap", "garbage"])
def test_malformed_safetensors_header_is_a_clean_error(tiny_dir, tmp_path, kind):
    d = _copy_dir(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if kind == "oversized-length":
        _header_file(f, {"a": entry}, b"\0" * 8, length=2**62)
    elif kind == "offsets-out-of-range":
        _header_file(f, {"a": {**entry, "data_offsets": [0, 4096]}, "b": entry}, b"\0" * 8)
    elif kind == "overlap":
        _header_file(f, {"a": entry, "b": {**entry, "data_offsets": [4, 12]}}, b"\0" * 12)
    else:
        f.write_bytes(b"\xff" * 40)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mio.load(d)


def test_unknown_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so 'no/such-model' is not a local path either
    with pytest.raises(FileNotFoundError, match="no/such-model"):
        mio.load("no/such-model")


def test_missing_dir_and_file_paths(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mio.load(tiny_dir / "model.safetensors")  # a file, not a dir
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        mio.load(empty)
    with pytest.raises(ValueError, match="float8"):
        mio.load(tiny_dir, dtype="float8")
