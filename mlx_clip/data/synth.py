"""Synthetic, learnable datasets for the demo, tests and quality benchmarks (see docs/DATA.md).

`synthesize(domain, out_dir, n, seed)` writes `images/`, `train.csv`, `val.csv`, `test.csv` (filepath,caption,label),
`classes.txt`, `templates.txt` and `info.json`. Every image has its own generator seeded by (seed, split, index), so
pixels, captions and splits are deterministic and the splits never share a seed. `synthesize_generic` writes the
generic shapes corpus the bundled base model is pretrained on, in the same layout.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_clip.data import painters as P

SPLITS = {"train": 0, "val": 1, "test": 2}  # the value enters the per-image seed: splits never share images


# ---- captions: several templates and synonyms per domain; the class name always appears verbatim ----------------

def _industrial_caption(rng, cls, w) -> str:
    phrase = {"scratch": ["a scratch", "a long scratch", "a thin scratch"], "hole": ["a hole", "a small hole"],
              "stain": ["a stain", "a large stain", "a dirty stain"], "crack": ["a crack", "a jagged crack"],
              "no defect": ["no defect"]}[cls]
    if w["kind"] == "metal":
        material = f"{_choice(rng, ['brushed', 'polished', 'machined'])} {w['material']}"
        noun = _choice(rng, ["surface", "plate", "sheet", "panel"])
    else:
        material, noun = w["material"], _choice(rng, ["surface", "cloth", "sample", "textile"])
    where = f" {w['where']}" if w["where"] else ""
    templates = ["a {m} {n} with {p}{w}.", "close-up photo of a {m} {n} showing {p}{w}.",
                 "inspection image of {m}: {p}.", "{p} on a {m} {n}{w}.", "a picture of a {m} {n}, {p}."]
    return _choice(rng, templates).format(m=material, n=noun, p=_choice(rng, phrase), w=where)


def _medical_caption(rng, cls, w) -> str:
    phrase = {"healthy tissue": ["healthy tissue"], "round lesion": ["a round lesion", "a single round lesion"],
              "multiple lesions": ["multiple lesions"],
              "irregular mass": ["an irregular mass", "a large irregular mass"],
              "dark cyst": ["a dark cyst", "a small dark cyst"]}[cls]
    scan = _choice(rng, ["CT scan", "MRI slice", "scan", "grayscale scan", "medical image"])
    where = f" {w['where']}" if w["where"] else ""
    templates = ["a {s} showing {p}{w}.", "{p} seen in a {s}{w}.", "{s} with {p}.",
                 "an axial {s} of the abdomen with {p}{w}."]
    return _choice(rng, templates).format(s=scan, p=_choice(rng, phrase), w=where)


def _scientific_caption(rng, cls, w) -> str:
    if cls.endswith("cells"):
        templates = ["a micrograph of {p} with {c} stain.", "{c} stained {p} under a microscope.",
                     "microscope image showing {p}, {c}.", "a {c} image of {p}."]
        return _choice(rng, templates).format(p=cls, c=w["colour"])
    templates = ["a {c} {p} on a {b} background.", "a figure with a {c} {p}.", "{p} drawn in {c}.",
                 "a plot: {p}, {c} on {b}."]
    return _choice(rng, templates).format(p=cls, c=w["colour"], b=w["background"])


NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _generic_caption(rng, cls, w) -> str:
    count = w["count"]
    shape = cls if count == 1 else ("crosses" if cls == "cross" else cls + "s")
    number = _choice(rng, ["a", "one"]) if count == 1 else NUMBERS[count]
    colour = "" if w["gray"] else w["colour"] + " "
    size = w["size"] + " " if rng.random() < 0.6 else ""
    texture = w["texture"] + " " if rng.random() < 0.7 else ""
    background = f"{texture}{'' if w['gray'] else w['background'] + ' '}background"
    where = f" {w['where']}" if w["where"] else ""
    templates = ["{n} {z}{c}{s}{w} on a {b}.", "a {b} with {n} {z}{c}{s}{w}.", "{n} {z}{c}{s} over a {b}."]
    text = _choice(rng, templates).format(n=number, z=size, c=colour, s=shape, w=where, b=background)
    if w["gray"]:
        return "a grayscale image of " + text
    return _choice(rng, ["", "", "a photo of ", "a picture of ", "an image of "]) + text  # the prompts' words


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


def _articles(text: str) -> str:
    """`a` before a vowel (or "MRI") becomes `an`: templates are written with `a`."""
    text = re.sub(r"\b([Aa]) (?=[aeiouAEIOU]|MRI)", r"\1n ", text)
    return text


DOMAINS = {
    # name: (classes, painter, caption, zero-shot templates, horizontal flip keeps the label)
    "industrial": (P.INDUSTRIAL_CLASSES, P.paint_industrial, _industrial_caption,
                   ["a photo of {}.", "an inspection image showing {}.", "a close-up of a surface with {}.",
                    "{} on a metal or fabric surface."], True),
    "medical": (P.MEDICAL_CLASSES, P.paint_medical, _medical_caption,
                ["a scan showing {}.", "a grayscale medical image with {}.", "a CT scan with {}.", "{}."], True),
    "scientific": (P.SCIENTIFIC_CLASSES, P.paint_scientific, _scientific_caption,
                   ["an image of {}.", "a figure showing {}.", "a scientific image of {}.", "{}."], False),
}
GENERIC = (P.SHAPES, P.paint_generic, _generic_caption, ["a photo of a {}.", "a {} shape.", "an image of a {}."], True)
_DOMAIN_IDS = {"industrial": 1, "medical": 2, "scientific": 3, "generic": 4}


def split_sizes(n: int, num_classes: int) -> dict[str, int]:
    """80/10/10, with at least one image per class in val and test when n allows it."""
    held = max(num_classes, int(round(n * 0.1))) if n >= 5 * num_classes else max(1, n // 10)
    return {"train": n - 2 * held, "val": held, "test": held}


def _save(img: Image.Image, path: Path, sixteen_bit: bool) -> None:
    if sixteen_bit:  # medical: a full-range 16-bit grayscale PNG, as scanners export
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * np.uint16(257)
        Image.fromarray(gray).save(path)
    elif img.mode == "RGB" and _is_gray(img):
        img.convert("L").save(path)
    else:
        img.save(path)


def _is_gray(img: Image.Image) -> bool:
    x = np.asarray(img)
    return bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())


def _write_split(name, spec, out_dir: Path, split: str, count: int, seed: int, image_size: int) -> list[dict]:
    classes, paint, caption, _, _ = spec
    folder = out_dir / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        rng = np.random.default_rng([seed, SPLITS[split], i, _DOMAIN_IDS[name]])
        label = i % len(classes)  # balanced: class counts differ by at most one
        img, words = paint(rng, label, image_size)
        path = folder / f"{i:05d}.png"
        _save(img, path, sixteen_bit=name == "medical" and i % 2 == 0)
        text = _articles(caption(rng, classes[label], words))
        rows.append({"filepath": path.relative_to(out_dir).as_posix(), "caption": text, "label": label})
    order = np.random.default_rng([seed, SPLITS[split], _DOMAIN_IDS[name], 99]).permutation(count)
    return [rows[j] for j in order]  # shuffled rows, so a file read in order is not sorted by class


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _synthesize(name, spec, out_dir, n, seed, image_size) -> dict:
    classes, _, _, templates, flip_ok = spec
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = split_sizes(n, len(classes))
    for split, count in sizes.items():
        _write_csv(out_dir / f"{split}.csv", _write_split(name, spec, out_dir, split, count, seed, image_size))
    (out_dir / "classes.txt").write_text("".join(c + "\n" for c in classes))
    (out_dir / "templates.txt").write_text("".join(t + "\n" for t in templates))
    info = {"domain": name, "n": n, "seed": seed, "image_size": image_size, "splits": sizes,
            "classes": list(classes), "templates": list(templates), "hflip_safe": flip_ok}
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "out_dir": str(out_dir)}


def synthesize(domain: str, out_dir, n: int = 3000, seed: int = 0, image_size: int = 64) -> dict:
    """Write a synthetic `domain` dataset ("industrial", "medical" or "scientific") of `n` images in total.

    Returns the dataset's info (also written to `info.json`): splits, classes, templates and `hflip_safe`
    (False for charts, where a flip turns a rising trend into a falling one).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return _synthesize(domain, DOMAINS[domain], out_dir, n, seed, image_size)


def synthesize_generic(out_dir, n: int = 10000, seed: int = 0, image_size: int = 64) -> dict:
    """Write the generic pretraining corpus: shapes of varied colour, count, size, texture and position with
    compositional captions ("two small red circles on a striped blue background"); labels index the shapes."""
    return _synthesize("generic", GENERIC, out_dir, n, seed, image_size)
