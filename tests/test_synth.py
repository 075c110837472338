"""Synthetic datasets: deterministic bytes, distinct splits, balanced classes, recoverable captions, 16-bit files,
and classes a simple model can tell apart."""

import csv
import hashlib
import re

from mlx_clip.data import DOMAINS, decode_image, read_csv, synthesize, synthesize_generic  # before mlx.core

import numpy as np
import pytest
from PIL import Image

N, SIZE = 60, 32
DOMAIN_WORDS = ["scratch", "hole", "stain", "crack", "defect", "lesion", "cyst", "mass", "tissue", "chart", "scatter",
                "cells", "micrograph"]


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root, split):
    with open(root / f"{split}.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=list(DOMAINS))
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    info = synthesize(request.param, root, n=N, seed=7, image_size=SIZE)
    return request.param, root, info


def test_deterministic_bytes(dataset, tmp_path):
    domain, root, _ = dataset
    synthesize(domain, tmp_path / "again", n=N, seed=7, image_size=SIZE)
    assert _digests(root) == _digests(tmp_path / "again")
    synthesize(domain, tmp_path / "other", n=N, seed=8, image_size=SIZE)
    assert _digests(root)["images/train/00000.png"] != _digests(tmp_path / "other")["images/train/00000.png"]


def test_layout_balance_and_distinct_splits(dataset):
    domain, root, info = dataset
    classes = (root / "classes.txt").read_text().splitlines()
    assert 4 <= len(classes) <= 6 and classes == info["classes"]
    templates = (root / "templates.txt").read_text().splitlines()
    assert templates and all("{}" in t for t in templates)
    digests = {}
    for split in ["train", "val", "test"]:
        rows = _rows(root, split)
        assert len(rows) == info["splits"][split] and list(rows[0]) == ["filepath", "caption", "label"]
        counts = np.bincount([int(r["label"]) for r in rows], minlength=len(classes))
        assert counts.max() - counts.min() <= 1 and counts.min() >= 1, (split, counts)
        for r in rows:
            assert not r["filepath"].startswith("/") and (root / r["filepath"]).is_file()
            digests[hashlib.sha256((root / r["filepath"]).read_bytes()).hexdigest()] = split
    assert len(digests) == sum(info["splits"].values())  # no image repeated within or across splits


def _class_mentions(caption, classes):
    return [c for c in classes if re.search(rf"\b{re.escape(c)}\b", caption)]


def test_captions_name_exactly_their_class(dataset):
    _, root, info = dataset
    rows = _rows(root, "train")
    for r in rows:
        assert _class_mentions(r["caption"], info["classes"]) == [info["classes"][int(r["label"])]], r
    assert len({r["caption"] for r in rows}) > len(info["classes"]) * 2  # varied, not one caption per class


def test_medical_stores_16bit_pngs(tmp_path):
    synthesize("medical", tmp_path, n=N, seed=1, image_size=SIZE)
    modes = {}
    for r in _rows(tmp_path, "train"):
        path = tmp_path / r["filepath"]
        img = Image.open(path)
        modes[img.mode] = modes.get(img.mode, 0) + 1
        if img.mode == "I;16":  # full 16-bit range; decoding maps it back to 8 bits exactly
            x = np.asarray(img).astype(np.uint32)
            assert x.max() > 255
            np.testing.assert_array_equal(np.asarray(decode_image(path))[..., 0], np.rint(x * 255 / 65535))
    assert modes.get("I;16", 0) > 0 and modes.get("L", 0) > 0


def _features(root, split):
    """Global, position-free features: the image's sorted pixel intensities per channel and its gradient energy."""
    feats, labels = [], []
    for r in read_csv(root / f"{split}.csv"):
        x = np.asarray(decode_image(r["image"]), np.float32) / 255
        gx, gy = np.abs(np.diff(x, axis=1)).mean(), np.abs(np.diff(x, axis=0)).mean()
        q = np.quantile(x.reshape(-1, 3), np.linspace(0, 1, 21), axis=0).ravel()
        q = q - np.median(x)  # brightness of the background is nuisance
        feats.append(np.concatenate([q, [gx, gy]]))
        labels.append(r["label"])
    return np.array(feats), np.array(labels)


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_classes_visually_separable(domain, tmp_path):
    """Even a 1-nearest-neighbour on crude global features, blind to position, beats chance by a wide margin."""
    synthesize(domain, tmp_path, n=300, seed=3, image_size=SIZE)
    classes = (tmp_path / "classes.txt").read_text().splitlines()
    xtr, ytr = _features(tmp_path, "train")
    xte, yte = _features(tmp_path, "test")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    pred = ytr[np.argmin(((xte[:, None] - xtr[None]) ** 2).sum(-1), axis=1)]
    acc = (pred == yte).mean()
    assert acc > 2.5 / len(classes), acc


def test_generic_corpus(tmp_path):
    info = synthesize_generic(tmp_path, n=80, seed=0, image_size=SIZE)
    rows = _rows(tmp_path, "train")
    assert info["classes"] == (tmp_path / "classes.txt").read_text().splitlines()
    for r in rows:
        shape = info["classes"][int(r["label"])]
        assert re.search(rf"\b{shape}(s|es)?\b", r["caption"]), r
        assert not any(w in r["caption"] for w in DOMAIN_WORDS), r  # domain labels are not given away
    words = {w for r in rows for w in re.findall(r"[a-z]+", r["caption"])}
    assert {"red", "blue", "background", "striped", "woven", "small", "large", "two", "grayscale"} <= words
